//! Read-modify-write: incrementing counters of key-value records (seed 002 §3.2), by an
//! offloaded `kv_increment.c` against `flock` + `pread` + `pwrite` through the mount, with
//! 1–4 workers on the same file. Both must end with every increment counted.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use anyhow::{Result, bail};
use nearfs_client::Run;
use nearfs_client::layouts::{Rng, kv};
use serde::{Deserialize, Serialize};

use crate::Plan;
use crate::measure::{self, Stats};
use crate::setup::{self, Mounted, Work};

/// Records in the file; workers pick one at random for each increment.
const SLOTS: u64 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Way {
    /// One RUN ioctl with write intent.
    Offload,
    /// `flock(LOCK_EX)`, `pread` of the record, key compare, `pwrite` of the counter,
    /// `flock(LOCK_UN)`.
    ReadWrite,
}

impl Way {
    pub fn label(self) -> &'static str {
        match self {
            Way::Offload => "offload (1 ioctl)",
            Way::ReadWrite => "flock + pread + pwrite via mount",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub way: Way,
    /// Workers, each with its own open file description (as separate processes have).
    pub workers: usize,
    pub stats: Stats,
}

/// The key of record `slot`.
pub fn key(slot: u64) -> [u8; kv::KEY] {
    let mut k = [b'.'; kv::KEY];
    let name = format!("record-{slot:08}");
    k[..name.len()].copy_from_slice(name.as_bytes());
    k
}

fn total(file: &File) -> Result<u64> {
    let mut bytes = vec![0u8; SLOTS as usize * kv::SIZE];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes.chunks_exact(kv::SIZE).map(kv::counter).sum())
}

fn flock(file: &File, op: i32) -> Result<()> {
    // SAFETY: flock takes a descriptor we hold open and a number.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

pub fn measure(plan: &Plan, work: &Work, m: &Mounted, rows: &mut Vec<Row>) -> Result<()> {
    let path = m.path("counters.kv");
    let data: Vec<u8> = (0..SLOTS).flat_map(|s| kv::record(&key(s), 0)).collect();
    std::fs::write(&path, &data)?;
    let file = setup::open(&path, false, true)?;
    let prog = work.load(&file, "../bpf-progs/kv_increment.c")?;
    for way in [Way::Offload, Way::ReadWrite] {
        for &workers in &plan.rmw_workers {
            let before = total(&file)?;
            let setup = |t: usize| -> Result<(File, Rng)> {
                Ok((setup::open(&path, false, true)?, Rng::new(t as u64 + 11)))
            };
            let op = |(f, rng): &mut (File, Rng)| -> Result<()> {
                let slot = rng.below(SLOTS);
                match way {
                    Way::Offload => {
                        let arg = kv::arg(slot, &key(slot));
                        let out = nearfs_client::run(f, &Run::new(prog).arg(&arg).write(true))?;
                        if out.result as i64 <= 0 {
                            bail!("kv_increment of slot {slot} returned {}", out.result as i64);
                        }
                    }
                    Way::ReadWrite => {
                        let at = slot * kv::SIZE as u64;
                        let mut rec = [0u8; kv::SIZE];
                        flock(f, libc::LOCK_EX)?;
                        let done = f.read_exact_at(&mut rec, at).and_then(|()| {
                            if rec[..kv::KEY] != key(slot) {
                                return Err(std::io::Error::other("a record with another key"));
                            }
                            let next = kv::counter(&rec) + 1;
                            f.write_all_at(&next.to_le_bytes(), at + kv::KEY as u64)
                        });
                        flock(f, libc::LOCK_UN)?;
                        done?;
                    }
                }
                Ok(())
            };
            let stats = measure::threads(workers, plan.cell, setup, op)?;
            let after = total(&file)?;
            if after.checked_sub(before) != Some(stats.ops) {
                bail!(
                    "{} with {workers} workers: the counters went from {before} to {after} in {} increments",
                    way.label(),
                    stats.ops
                );
            }
            rows.push(Row {
                way,
                workers,
                stats,
            });
        }
    }
    nearfs_client::unload(&file, prog)?;
    Ok(())
}
