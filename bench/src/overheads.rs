//! The appcode runtime's own costs, in this process without FUSE: verification time of
//! every example program, JIT against interpreter, and setting up a run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use appcode::{Extent, Mode, Program, Request, World, elf, program};
use blockdev::{BlockDevice, MemDevice};
use serde::{Deserialize, Serialize};

use crate::setup;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verification {
    pub program: String,
    pub insns: usize,
    /// The verifier's proven bound on instructions per invocation.
    pub max_insns: u64,
    pub processed: u64,
    pub states: u64,
    pub ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Engines {
    pub workload: String,
    pub jit_us: f64,
    pub interpreter_us: f64,
    /// Bytes per second on the JIT, for the scan.
    pub jit_mb_per_sec: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Overheads {
    pub verification: Vec<Verification>,
    pub engines: Vec<Engines>,
    /// A program that returns at once over an empty range, per engine.
    pub setup_ns_jit: f64,
    pub setup_ns_interpreter: f64,
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
            let t = per_call(batch, || {
                program::prepare(linked, &loaded, Default::default())?;
                Ok(())
            })?;
            verification.push(Verification {
                program: linked.name.clone(),
                insns: p.insns.len(),
                max_insns: p.verified.max_insns,
                processed: p.verified.processed as u64,
                states: p.verified.states as u64,
                ms: t.as_secs_f64() * 1e3,
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

    let scan: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let keys: Vec<u64> = (0..512u64).map(|i| i * 7 + 3).collect();
    let node: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    let workloads = [
        (
            "byte scan of 1 MiB (bytecount)",
            "bytecount",
            scan.as_slice(),
            vec![7],
        ),
        (
            "binary search in a 4 KiB node (bsearch)",
            "bsearch",
            node.as_slice(),
            keys[300].to_le_bytes().to_vec(),
        ),
    ];
    let mut engines = Vec::new();
    for (workload, name, data, arg) in workloads {
        let file = MemFile::new(data)?;
        let req = Request {
            arg: &arg,
            ..Default::default()
        };
        let mut times = Vec::new();
        let mut results = Vec::new();
        for mode in [Mode::Checked, Mode::Interpreter] {
            let p = Program::from_elf(object(name)?, None, mode)?;
            results.push(p.run(file.world(), &req)?.result);
            times.push(per_call(batch, || {
                p.run(file.world(), &req)?;
                Ok(())
            })?);
        }
        if results[0] != results[1] {
            bail!(
                "{name}: the JIT says {}, the interpreter {}",
                results[0],
                results[1]
            );
        }
        engines.push(Engines {
            workload: workload.into(),
            jit_us: times[0].as_secs_f64() * 1e6,
            interpreter_us: times[1].as_secs_f64() * 1e6,
            jit_mb_per_sec: (name == "bytecount")
                .then(|| data.len() as f64 / times[0].as_secs_f64() / 1e6),
        });
    }

    let nothing = appcode::asm::assemble("mov %r0, 0\nexit")?;
    let empty = MemFile::new(&[])?;
    let mut setup_ns = Vec::new();
    for mode in [Mode::Checked, Mode::Interpreter] {
        let p = Program::from_insns("nothing", &nothing, mode)?;
        let t = per_call(batch, || {
            p.run(empty.world(), &Request::default())?;
            Ok(())
        })?;
        setup_ns.push(t.as_secs_f64() * 1e9);
    }
    Ok(Overheads {
        verification,
        engines,
        setup_ns_jit: setup_ns[0],
        setup_ns_interpreter: setup_ns[1],
    })
}
