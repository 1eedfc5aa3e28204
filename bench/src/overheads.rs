//! The appcode runtime's own costs, in this process without FUSE: verification and
//! compilation of every example program, the same workloads on each engine (the checked
//! engine every program from a user runs on, rbpf's unchecked JIT it replaced, and rbpf's
//! interpreter), and setting up a run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use appcode::{Extent, Mode, Program, Request, World, elf, program};
use blockdev::{BlockDevice, MemDevice};
use nearfs_client::layouts::{Rng, btree};
use serde::{Deserialize, Serialize};

use crate::setup;

/// The engines, in table order.
pub const ENGINES: [(Mode, &str); 3] = [
    (Mode::Checked, "checked"),
    (Mode::UncheckedJit, "unchecked JIT"),
    (Mode::Interpreter, "interpreter"),
];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verification {
    pub program: String,
    pub insns: usize,
    /// The verifier's proven bound on instructions per invocation.
    pub max_insns: u64,
    pub processed: u64,
    pub states: u64,
    pub ms: f64,
    /// Compiling the verified program for the checked engine (median).
    pub compile_ms: f64,
    /// Bytes of machine code and everything else the loaded program holds.
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Engines {
    pub workload: String,
    /// Time per run on each engine of [`ENGINES`], µs.
    pub us: [f64; 3],
    /// File bytes each run scans, for the scans (GB/s).
    pub bytes: Option<u64>,
}

impl Engines {
    pub fn gb_per_sec(&self, engine: usize) -> Option<f64> {
        Some(self.bytes? as f64 / self.us[engine] / 1e3)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Overheads {
    pub verification: Vec<Verification>,
    pub engines: Vec<Engines>,
    /// A program that returns at once over an empty range, per engine of [`ENGINES`], ns.
    pub setup_ns: [f64; 3],
}

/// Median over 7 batches of the time per call of `f`, with batches of about `batch`.
fn per_call(batch: Duration, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    f()?;
    let once = start.elapsed().max(Duration::from_nanos(20));
    let n = (batch.as_nanos() / once.as_nanos()).clamp(1, 10_000_000) as u32;
    let mut batches = Vec::with_capacity(7);
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..n {
            f()?;
        }
        batches.push(t.elapsed() / n);
    }
    batches.sort();
    Ok(batches[3])
}

/// A file held in memory, as the runtime sees one.
struct MemFile {
    device: MemDevice,
    extents: Vec<Extent>,
    size: u64,
}

impl MemFile {
    fn new(data: &[u8]) -> Result<MemFile> {
        let device = MemDevice::new(data.len() as u64 + 8192);
        device.write_at(data, 4096)?;
        Ok(MemFile {
            device,
            extents: vec![Extent {
                file_off: 0,
                dev_off: 4096,
                len: data.len() as u64,
                unwritten: false,
            }],
            size: data.len() as u64,
        })
    }

    fn world(&self) -> World<'_> {
        World {
            device: &self.device,
            extents: &self.extents,
            file_size: self.size,
            range: 0..self.size,
            writable: false,
        }
    }
}

/// One workload: a program over a file, with the arguments of successive runs and the
/// answer each must give.
struct Workload {
    name: &'static str,
    program: &'static str,
    file: MemFile,
    /// (argument, expected r0); runs cycle through them.
    cases: Vec<(Vec<u8>, u64)>,
    /// File bytes one run scans, for scans.
    scanned: Option<u64>,
}

fn workloads() -> Result<Vec<Workload>> {
    let scan: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let sevens = scan.iter().filter(|&&b| b == 7).count() as u64;
    let records: Vec<u8> = (0..1u64 << 16)
        .flat_map(|i| [i.to_le_bytes(), (i * 37 % 1000).to_le_bytes()])
        .flatten()
        .collect();
    let in_range = (0..1u64 << 16).filter(|i| i * 37 % 1000 < 100).count() as u64;
    let keys: Vec<u64> = (0..512u64).map(|i| i * 7 + 3).collect();
    let node: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    // A depth-4 tree of nodes holding 8 keys, as the lookup benchmark's.
    let mut rng = Rng::new(99);
    let pairs: Vec<(u64, u64)> = (0..4096u64).map(|i| (i * 3, rng.next_u64() >> 1)).collect();
    let (tree, depth) = btree::build(&pairs, 8);
    if depth != 4 {
        bail!("the lookup tree has depth {depth}, not 4");
    }
    let lookups: Vec<(Vec<u8>, u64)> = (0..64)
        .map(|_| {
            let (k, v) = pairs[rng.below(pairs.len() as u64) as usize];
            (k.to_le_bytes().to_vec(), v)
        })
        .collect();
    let u64s = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    Ok(vec![
        Workload {
            name: "B+-tree lookup, depth 4 (btree)",
            program: "btree",
            file: MemFile::new(&tree)?,
            cases: lookups,
            scanned: None,
        },
        Workload {
            name: "binary search in a 4 KiB node (bsearch)",
            program: "bsearch",
            file: MemFile::new(&node)?,
            cases: vec![(keys[300].to_le_bytes().to_vec(), 300)],
            scanned: None,
        },
        Workload {
            name: "filter and aggregate over 1 MiB of records (filter)",
            program: "filter",
            file: MemFile::new(&records)?,
            cases: vec![(u64s(&[0, 99]), in_range)],
            scanned: Some(records.len() as u64),
        },
        Workload {
            name: "byte scan of 1 MiB (bytecount)",
            program: "bytecount",
            file: MemFile::new(&scan)?,
            cases: vec![(vec![7], sevens)],
            scanned: Some(scan.len() as u64),
        },
    ])
}

pub fn measure(batch: Duration, objects: &std::path::Path) -> Result<Overheads> {
    let mut sources: Vec<_> = std::fs::read_dir(setup::source_dir("../bpf-progs"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    sources.retain(|p| p.extension().is_some_and(|e| e == "c"));
    sources.sort();
    let mut verification = Vec::new();
    let mut compiled = Vec::new();
    for c in &sources {
        let obj = setup::compile(c, objects)?;
        let loaded = elf::load(&obj)?;
        for linked in &loaded.programs {
            let p = program::prepare(linked, &loaded, Default::default())?;
            let verify = per_call(batch, || {
                program::prepare(linked, &loaded, Default::default())?;
                Ok(())
            })?;
            let (mut bytes, mut compile) = (0, Vec::new());
            per_call(batch, || {
                let p = Program::from_elf(&obj, Some(&linked.name), Mode::Checked)?;
                bytes = p.footprint();
                compile.push(p.compile_time());
                Ok(())
            })?;
            compile.sort();
            let compile = compile[compile.len() / 2];
            verification.push(Verification {
                program: linked.name.clone(),
                insns: p.insns.len(),
                max_insns: p.verified.max_insns,
                processed: p.verified.processed,
                states: p.verified.states as u64,
                ms: verify.as_secs_f64() * 1e3,
                compile_ms: compile.as_secs_f64() * 1e3,
                bytes: bytes as u64,
            });
        }
        let stem = c.file_stem().context("a source")?.to_string_lossy();
        compiled.push((stem.into_owned(), obj));
    }
    let object = |name: &str| -> Result<&[u8]> {
        compiled
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, o)| o.as_slice())
            .with_context(|| format!("bpf-progs/{name}.c"))
    };

    let mut engines = Vec::new();
    for w in workloads()? {
        let mut us = [0.0; 3];
        for (k, (mode, label)) in ENGINES.iter().enumerate() {
            let p = Program::from_elf(object(w.program)?, None, *mode)?;
            let mut next = 0;
            let t = per_call(batch, || {
                let (arg, want) = &w.cases[next % w.cases.len()];
                next += 1;
                let req = Request {
                    arg,
                    ..Default::default()
                };
                let got = p.run(w.file.world(), &req)?.result;
                if got != *want {
                    bail!("{}: the {label} engine says {got}, not {want}", w.name);
                }
                Ok(())
            })?;
            us[k] = t.as_secs_f64() * 1e6;
        }
        engines.push(Engines {
            workload: w.name.into(),
            us,
            bytes: w.scanned,
        });
    }

    let nothing = appcode::asm::assemble("mov %r0, 0\nexit")?;
    let empty = MemFile::new(&[])?;
    let mut setup_ns = [0.0; 3];
    for (k, (mode, _)) in ENGINES.iter().enumerate() {
        let p = Program::from_insns("nothing", &nothing, *mode)?;
        let t = per_call(batch, || {
            p.run(empty.world(), &Request::default())?;
            Ok(())
        })?;
        setup_ns[k] = t.as_secs_f64() * 1e9;
    }
    Ok(Overheads {
        verification,
        engines,
        setup_ns,
    })
}
