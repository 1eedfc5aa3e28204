//! Files apart: reads of one file while another is written, and offloaded lookups on
//! different files from one and two threads. Each file has its own lock across device I/O
//! (`extents/src/state.rs`), so work on one file should not wait for work on another.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Result, bail};
use nearfs_client::Run;
use nearfs_client::layouts::Rng;
use serde::{Deserialize, Serialize};

use crate::Plan;
use crate::lookups::Tree;
use crate::measure::{self, Stats};
use crate::setup::{self, Aligned, Mounted, Work};

/// The file read 4 KiB at a time, and the one another thread reads or writes meanwhile.
const READ_FILE: u64 = 64 << 20;
const OTHER_FILE: u64 = 256 << 20;
const READ: usize = 4096;
const OTHER_IO: usize = 1 << 20;

/// What the other thread does to its own file while the reads are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Background {
    /// 1 MiB `O_DIRECT` reads, one after another.
    Reads,
    /// 1 MiB `O_DIRECT` writes, one after another.
    Writes,
}

impl Background {
    pub fn label(self) -> &'static str {
        match self {
            Background::Reads => "another file read, 1 MiB O_DIRECT",
            Background::Writes => "another file written, 1 MiB O_DIRECT",
        }
    }
}

/// 4 KiB `O_DIRECT` random reads of one file, with the other thread busy on its file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Contention {
    pub background: Background,
    pub reads: Stats,
    /// What the other thread moved meanwhile, MB/s.
    pub background_mb_per_sec: f64,
}

/// Offloaded lookups (`btree.c`) with `threads` threads, each on a file of its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scaling {
    pub depth: usize,
    pub threads: usize,
    pub stats: Stats,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub contention: Vec<Contention>,
    pub scaling: Vec<Scaling>,
}

impl Results {
    pub fn contention(&self, b: Background) -> Option<&Stats> {
        self.contention
            .iter()
            .find(|c| c.background == b)
            .map(|c| &c.reads)
    }

    pub fn scaling(&self, threads: usize) -> Option<&Stats> {
        self.scaling
            .iter()
            .find(|s| s.threads == threads)
            .map(|s| &s.stats)
    }
}

pub fn measure(plan: &Plan, work: &Work, m: &Mounted, tree: &Tree) -> Result<Results> {
    let mut r = Results::default();
    contention(plan, m, &mut r)?;
    scaling(plan, work, m, tree, &mut r)?;
    Ok(r)
}

fn contention(plan: &Plan, m: &Mounted, r: &mut Results) -> Result<()> {
    let (read_path, other_path) = (m.path("contention-read"), m.path("contention-other"));
    for (path, len) in [(&read_path, READ_FILE), (&other_path, OTHER_FILE)] {
        let f = File::create(path)?;
        let piece = vec![0x5au8; OTHER_IO];
        for at in (0..len).step_by(OTHER_IO) {
            f.write_all_at(&piece, at)?;
        }
    }
    for background in [Background::Reads, Background::Writes] {
        let stop = AtomicBool::new(false);
        let moved = AtomicU64::new(0);
        let reads = std::thread::scope(|s| -> Result<(Stats, f64)> {
            let other = s.spawn(|| -> Result<()> {
                let f = setup::open(&other_path, true, background == Background::Writes)?;
                let mut buf = Aligned::new(OTHER_IO);
                buf.get().fill(0xa5);
                let mut at = 0;
                while !stop.load(Ordering::Relaxed) {
                    match background {
                        Background::Reads => f.read_exact_at(buf.get(), at)?,
                        Background::Writes => f.write_all_at(buf.get(), at)?,
                    }
                    moved.fetch_add(OTHER_IO as u64, Ordering::Relaxed);
                    at = (at + OTHER_IO as u64) % OTHER_FILE;
                }
                Ok(())
            });
            let started = std::time::Instant::now();
            let setup = |_| -> Result<(File, Aligned, Rng)> {
                Ok((
                    setup::open(&read_path, true, false)?,
                    Aligned::new(READ),
                    Rng::new(77),
                ))
            };
            let read = |(f, buf, rng): &mut (File, Aligned, Rng)| -> Result<()> {
                let at = rng.below(READ_FILE / READ as u64) * READ as u64;
                f.read_exact_at(buf.get(), at)?;
                if buf.get()[0] != 0x5a {
                    bail!("a read of the untouched file found {:#x}", buf.get()[0]);
                }
                Ok(())
            };
            let stats = measure::threads(1, plan.cell, setup, read);
            stop.store(true, Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64();
            other.join().expect("the other thread panicked")?;
            Ok((stats?, moved.load(Ordering::Relaxed) as f64 / secs / 1e6))
        })?;
        r.contention.push(Contention {
            background,
            reads: reads.0,
            background_mb_per_sec: reads.1,
        });
    }
    std::fs::remove_file(&read_path)?;
    std::fs::remove_file(&other_path)?;
    Ok(())
}

fn scaling(plan: &Plan, work: &Work, m: &Mounted, tree: &Tree, r: &mut Results) -> Result<()> {
    let threads = 2;
    let copies: Vec<_> = (0..threads)
        .map(|t| m.path(&format!("apart-{t}-{}", tree.name)))
        .collect();
    for copy in &copies {
        std::fs::copy(m.path(&tree.name), copy)?;
    }
    let probe = File::open(&copies[0])?;
    let lookup = work.load(&probe, "../bpf-progs/btree.c")?;
    for n in 1..=threads {
        let setup = |t: usize| -> Result<(File, Rng)> {
            Ok((
                File::open(&copies[t])?,
                Rng::new(((t as u64 + 1) << 32) | 0xa9a7),
            ))
        };
        let op = |(f, rng): &mut (File, Rng)| -> Result<()> {
            let (key, want, _) = tree.samples[rng.below(tree.samples.len() as u64) as usize];
            let arg = key.to_le_bytes();
            let got = nearfs_client::run(f, &Run::new(lookup).arg(&arg))?.result;
            if got != want {
                bail!("a lookup of {key} gave {got}, not {want}");
            }
            Ok(())
        };
        r.scaling.push(Scaling {
            depth: tree.depth,
            threads: n,
            stats: measure::threads(n, plan.cell, setup, op)?,
        });
    }
    nearfs_client::unload(&probe, lookup)?;
    for copy in &copies {
        std::fs::remove_file(copy)?;
    }
    Ok(())
}
