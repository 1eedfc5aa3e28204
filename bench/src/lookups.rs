//! Dependent lookups: B+-tree point lookups at depths 1–6, by one offload ioctl (a chain of
//! hops inside the daemon) against one `pread` per level through the mount and on the host
//! filesystem, next to the floor: a null ioctl plus the same device reads done directly.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use blockdev::{BlockDevice, FileDevice, LatencyDevice, OpenOptions};
use nearfs_client::layouts::{Rng, btree};
use nearfs_client::{ProgId, Run};
use serde::{Deserialize, Serialize};

use crate::Plan;
use crate::measure::{self, Stats};
use crate::setup::{self, Aligned, Mounted, Work};

/// Lookups each thread draws its keys from.
const SAMPLES: usize = 4096;
/// Keys per RUN of `btree_batch.c`.
pub const BATCH: usize = 64;

/// How a lookup (or its floor) is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Way {
    /// One RUN ioctl of `btree.c`: the daemon reads each node and calls the program again.
    Offload,
    /// One RUN of `btree_batch.c` for [`BATCH`] keys, whose crossing they share; its
    /// figures are per key.
    OffloadBatch,
    /// One `pread` per level through the mount, opened O_DIRECT: each is a FUSE round trip.
    MountDirect,
    /// The same with the nodes in the kernel's page cache: no round trip at all.
    MountCached,
    /// One `pread` per level of a copy on the host filesystem, from its page cache.
    HostCached,
    /// The same opened O_DIRECT: each read goes to the host's disk.
    HostDirect,
    /// The daemon's device reads without anything around them: the same nodes read from
    /// the image through the same device stack, in this process.
    RawDevice,
    /// A RUN ioctl of a program that returns at once over an empty range.
    NullRun,
    /// The smallest ioctl there is (VERSION, 8 bytes each way).
    VersionIoctl,
}

impl Way {
    pub fn label(self) -> &'static str {
        match self {
            Way::Offload => "offload (1 ioctl)",
            Way::OffloadBatch => "offload, 64 keys per ioctl (per key)",
            Way::MountDirect => "preads via mount",
            Way::MountCached => "preads via mount, page cache",
            Way::HostCached => "preads on host fs, page cache",
            Way::HostDirect => "preads on host fs, O_DIRECT",
            Way::RawDevice => "raw device reads",
            Way::NullRun => "null RUN ioctl",
            Way::VersionIoctl => "VERSION ioctl",
        }
    }

    /// Whether its cost depends on the tree's depth.
    pub fn per_depth(self) -> bool {
        !matches!(self, Way::NullRun | Way::VersionIoctl)
    }

    /// Whether the nearfs device's latency reaches it (the others are measured once).
    fn sees_device(self) -> bool {
        matches!(
            self,
            Way::Offload | Way::OffloadBatch | Way::MountDirect | Way::RawDevice | Way::NullRun
        )
    }
}

/// One measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    /// Latency added to every device access, µs.
    pub device_us: u64,
    /// Tree depth; 0 for ways that read no tree.
    pub depth: usize,
    pub way: Way,
    pub threads: usize,
    pub stats: Stats,
    /// For ways that run appcode: the daemon's mean time per run (`run_ns` of
    /// `user.nearfs.stats`), µs; the rest of a run's latency is the crossing.
    pub daemon_us: Option<f64>,
}

/// A tree of one depth, on the mount and as a host copy.
pub struct Tree {
    pub depth: usize,
    /// The file's name, on the mount and in the host directory.
    pub name: String,
    /// `(key, value, file offsets of the nodes a lookup reads)`.
    pub samples: Vec<(u64, u64, Vec<u64>)>,
    /// Device offsets of the same nodes, once the file is on the mount.
    device_paths: Vec<Vec<u64>>,
}

/// Writes one tree per depth (each node filled to `plan.fill` keys, so that depth 6 stays
/// small) to the mount and the host directory.
pub fn prepare(plan: &Plan, work: &Work, m: &Mounted) -> Result<Vec<Tree>> {
    write_trees(plan.fill, plan.max_depth, m, Some(&work.host))
}

/// Trees of depth 1 to `max_depth` with `fill` keys per node, written to the mount and,
/// if given, to a host directory.
pub fn write_trees(
    fill: usize,
    max_depth: usize,
    m: &Mounted,
    host: Option<&std::path::Path>,
) -> Result<Vec<Tree>> {
    let mut trees = Vec::new();
    for depth in 1..=max_depth {
        let keys = (fill as u64).pow(depth as u32);
        let pairs: Vec<(u64, u64)> = (0..keys).map(|i| (i * 16 + 5, i * 3)).collect();
        let (bytes, built) = btree::build(&pairs, fill);
        if built != depth {
            bail!("a tree of {keys} keys came out {built} deep, not {depth}");
        }
        let name = format!("tree-{depth}.db");
        std::fs::write(m.path(&name), &bytes)?;
        if let Some(host) = host {
            std::fs::write(host.join(&name), &bytes)?;
        }
        let mut rng = Rng::new(depth as u64);
        let mut samples = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let (k, v) = pairs[rng.below(keys) as usize];
            let mut path = Vec::new();
            let read = |n: &mut [u8], at: u64| {
                path.push(at);
                n.copy_from_slice(&bytes[at as usize..at as usize + n.len()]);
                Ok(())
            };
            if btree::lookup(read, k)? != Some(v) {
                bail!("the tree of depth {depth} does not hold key {k}");
            }
            samples.push((k, v, path));
        }
        trees.push(Tree {
            depth,
            name,
            samples,
            device_paths: Vec::new(),
        });
    }
    Ok(trees)
}

/// What each benchmark thread holds.
struct State {
    file: File,
    buf: Aligned,
    rng: Rng,
}

/// Every way at every depth and thread count, on the mount `m` whose device adds
/// `device_us` to each access. With `device_us` 0, the ways the device does not reach are
/// measured too.
pub fn measure(
    plan: &Plan,
    work: &Work,
    m: &Mounted,
    device_us: u64,
    trees: &mut [Tree],
    rows: &mut Vec<Row>,
) -> Result<()> {
    let probe = File::open(m.path(&trees[0].name))?;
    let lookup = work.load(&probe, "../bpf-progs/btree.c")?;
    let batch = work.load(&probe, "../bpf-progs/btree_batch.c")?;
    let null = work.load(&probe, "progs/null.c")?;
    let image = FileDevice::open(
        &work.image,
        OpenOptions {
            direct: false,
            read_only: true,
        },
    )?;
    let mut device: Arc<dyn BlockDevice> = Arc::new(image);
    if device_us > 0 {
        device = Arc::new(LatencyDevice::new(device, Duration::from_micros(device_us)));
    }
    for tree in trees.iter_mut() {
        let extents = setup::extents(&m.path(&tree.name))?;
        tree.device_paths = tree
            .samples
            .iter()
            .map(|(_, _, path)| {
                path.iter()
                    .map(|&off| setup::translate(&extents, off).context("a node outside the file"))
                    .collect()
            })
            .collect::<Result<_>>()?;
    }

    let ways = [
        Way::Offload,
        Way::OffloadBatch,
        Way::MountDirect,
        Way::MountCached,
        Way::HostCached,
        Way::HostDirect,
        Way::RawDevice,
        Way::NullRun,
        Way::VersionIoctl,
    ];
    for way in ways
        .into_iter()
        .filter(|w| device_us == 0 || w.sees_device())
    {
        let depths: Vec<&Tree> = if way.per_depth() {
            trees.iter().collect()
        } else {
            vec![&trees[0]]
        };
        for tree in depths {
            let path = match way {
                Way::HostCached | Way::HostDirect => work.host.join(&tree.name),
                _ => m.path(&tree.name),
            };
            let direct = matches!(way, Way::MountDirect | Way::HostDirect);
            if way == Way::HostDirect
                && let Err(e) = setup::open(&path, true, false)
            {
                // Some filesystems (tmpfs before Linux 6.6, some overlays) refuse O_DIRECT.
                eprintln!("    skipping {}: {e:#}", way.label());
                break;
            }
            for &threads in &plan.threads {
                let setup = |t: usize| -> Result<State> {
                    let file = setup::open(&path, direct, false)?;
                    setup::no_readahead(&file);
                    Ok(State {
                        file,
                        buf: Aligned::new(btree::NODE),
                        rng: Rng::new(((t as u64 + 1) << 32) | tree.depth as u64),
                    })
                };
                let op = |s: &mut State| -> Result<()> {
                    let i = s.rng.below(tree.samples.len() as u64) as usize;
                    let (key, want, _) = tree.samples[i];
                    let got = match way {
                        Way::Offload => {
                            let arg = key.to_le_bytes();
                            let run = Run::new(lookup).arg(&arg);
                            Some(nearfs_client::run(&s.file, &run)?.result)
                        }
                        Way::OffloadBatch => return batch_run(&s.file, batch, tree, &mut s.rng),
                        Way::NullRun => return null_run(&s.file, null),
                        Way::VersionIoctl => {
                            nearfs_client::version(&s.file)?;
                            return Ok(());
                        }
                        Way::RawDevice => {
                            let buf = s.buf.get();
                            for &dev in &tree.device_paths[i] {
                                device.read_at(buf, dev)?;
                            }
                            return Ok(());
                        }
                        _ => by_preads(s, direct, key)?,
                    };
                    if got != Some(want) {
                        bail!(
                            "{}: key {key} gave {got:?}, not {want} (depth {})",
                            way.label(),
                            tree.depth
                        );
                    }
                    Ok(())
                };
                let runs = matches!(way, Way::Offload | Way::OffloadBatch | Way::NullRun);
                let before = if runs {
                    setup::run_stats(&path)?
                } else {
                    (0, 0)
                };
                let mut stats = measure::threads(threads, plan.cell, setup, op)?;
                let mut daemon_us = if runs {
                    let after = setup::run_stats(&path)?;
                    let n = after.0.saturating_sub(before.0).max(1);
                    Some(after.1.saturating_sub(before.1) as f64 / n as f64 / 1e3)
                } else {
                    None
                };
                if way == Way::OffloadBatch {
                    stats = stats.per_item(BATCH);
                    daemon_us = daemon_us.map(|us| us / BATCH as f64);
                }
                rows.push(Row {
                    device_us,
                    depth: if way.per_depth() { tree.depth } else { 0 },
                    way,
                    threads,
                    stats,
                    daemon_us,
                });
            }
        }
    }
    nearfs_client::unload(&probe, lookup)?;
    nearfs_client::unload(&probe, batch)?;
    nearfs_client::unload(&probe, null)?;
    Ok(())
}

/// The crossing alone, measured in turns (see [`measure::alternating`]): the VERSION
/// ioctl, a null RUN in the small struct and in the large one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Crossings {
    pub version: Stats,
    pub null_small: Stats,
    pub null_large: Stats,
}

pub fn crossings(plan: &Plan, work: &Work, m: &Mounted, tree: &Tree) -> Result<Crossings> {
    let file = File::open(m.path(&tree.name))?;
    let null = work.load(&file, "progs/null.c")?;
    let run = |expect: usize| {
        let run = Run::new(null).range(0, 0).expect_output(expect);
        nearfs_client::run(&file, &run)
            .map(|_| ())
            .map_err(Into::into)
    };
    let mut version = || {
        nearfs_client::version(&file)
            .map(|_| ())
            .map_err(Into::into)
    };
    let mut small = || run(0);
    let mut large = || run(nearfs_client::abi::OUT_CHUNK);
    let stats = measure::alternating(plan.cell * 3, &mut [&mut version, &mut small, &mut large])?;
    nearfs_client::unload(&file, null)?;
    Ok(Crossings {
        version: stats[0],
        null_small: stats[1],
        null_large: stats[2],
    })
}

/// [`BATCH`] random lookups in one RUN, each answer checked.
fn batch_run(file: &File, batch: ProgId, tree: &Tree, rng: &mut Rng) -> Result<()> {
    let picks: Vec<usize> = (0..BATCH)
        .map(|_| rng.below(tree.samples.len() as u64) as usize)
        .collect();
    let arg: Vec<u8> = picks
        .iter()
        .flat_map(|&i| tree.samples[i].0.to_le_bytes())
        .collect();
    let out = nearfs_client::run(file, &Run::new(batch).arg(&arg))?;
    let got = nearfs_client::layouts::words(&out.output);
    let want: Vec<u64> = picks.iter().map(|&i| tree.samples[i].1).collect();
    if got != want {
        bail!(
            "btree_batch at depth {} answered {got:?}, not {want:?}",
            tree.depth
        );
    }
    Ok(())
}

fn null_run(file: &File, null: ProgId) -> Result<()> {
    nearfs_client::run(file, &Run::new(null).range(0, 0))?;
    Ok(())
}

/// The lookup an application does without offload: one `pread` per level.
fn by_preads(s: &mut State, direct: bool, key: u64) -> Result<Option<u64>> {
    let State { file, buf, .. } = s;
    let found = btree::lookup(
        |n, at| {
            if direct {
                let b = buf.get();
                file.read_exact_at(b, at)?;
                n.copy_from_slice(b);
                Ok(())
            } else {
                file.read_exact_at(n, at)
            }
        },
        key,
    )?;
    Ok(found)
}
