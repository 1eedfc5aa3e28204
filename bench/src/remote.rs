//! Remote offload over NBD (seed 002's disaggregated case, its Figure 1 measured).
//!
//! One image is served over loopback NBD and mounted with `nearfs mount nbd://…`, with
//! `nbd_delay` 0 and 42 µs added to every request (the seed's 41.9 µs TCP round trip;
//! this kernel has no netem). Each operation is done three ways:
//!
//! - (i) by the application: `pread`s (and `pwrite`s) through the mount, opened
//!   `O_DIRECT`, so that every read reaches the daemon and, through it, the network;
//! - (ii) as appcode run in the daemon over the remote device (a mount over
//!   `nearfs serve --no-appcode`): every device read of the run is a round trip;
//! - (iii) as appcode run at the target (a mount over `nearfs serve`): one round trip.
//!
//! Round trips and bytes on the wire per operation are the deltas of the mount's
//! `nbd_requests=` and `nbd_bytes=` (`user.nearfs.fs`) over the timed operations; each
//! request is synchronous on its connection, so a request is a round trip. The same runs
//! on a local mount of the image, and a null RUN at the target and locally, give each
//! offload its floor: one round trip plus the run next to its device.
//!
//! [`block`] measures plain block service with fio against `nearfs serve`, `qemu-nbd`
//! and `nbdkit`.

mod block;
mod report;
mod servers;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nearfs_client::layouts::{Rng, btree, kv, records};
use nearfs_client::{ProgId, Run};
use serde::{Deserialize, Serialize};

pub use report::{BEGIN, END, Figure1};

use crate::lookups::{self, Tree};
use crate::measure::{self, Stats};
use crate::report::Target;
use crate::setup::{self, Aligned, Mounted, Work};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// What the application reads at a time in a binary search: one aligned block.
const BLOCK: usize = 4096;
/// Entries of a sorted file per block.
const PER_BLOCK: u64 = BLOCK as u64 / 8;
/// What the application reads at a time in a scan.
const SCAN_CHUNK: usize = 1 << 20;
/// Values of the scanned records are uniform below this.
const VALUES: u64 = 1_000_000;
/// A measurement stops at this many operations whatever its time.
const MAX_SAMPLES: usize = 200_000;

/// How much to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub mode: String,
    /// Each measurement runs at least this long…
    pub cell: Duration,
    /// …and at least this many timed operations, after `warmup` untimed ones.
    pub min_samples: usize,
    pub warmup: usize,
    /// `nbd_delay` of the mounts, µs.
    pub delays_us: Vec<u64>,
    /// Sizes of the sorted files searched (the larger one chosen when the run starts).
    pub bsearch_bytes: Vec<u64>,
    /// Keys per B+-tree node, and the deepest tree.
    pub fill: usize,
    pub max_depth: usize,
    pub kv_slots: u64,
    pub scan_bytes: u64,
    /// Fraction of the scanned records that match.
    pub scan_selectivity: f64,
    pub block: block::Plan,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        Plan {
            mode: if quick { "quick" } else { "full" }.into(),
            cell: Duration::from_millis(if quick { 30 } else { 1000 }),
            min_samples: if quick { 5 } else { 20 },
            warmup: if quick { 2 } else { 5 },
            delays_us: vec![0, 42],
            bsearch_bytes: vec![if quick { 16 * MIB } else { GIB }],
            fill: if quick { 4 } else { 8 },
            max_depth: 6,
            kv_slots: 256,
            scan_bytes: if quick { MIB } else { 16 * MIB },
            scan_selectivity: 0.01,
            block: block::Plan {
                image_bytes: if quick { 64 * MIB } else { GIB },
                runtime: Duration::from_millis(if quick { 300 } else { 5000 }),
                ramp: Duration::from_millis(if quick { 100 } else { 1000 }),
                iodepth: 16,
            },
        }
    }
}

/// An operation of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `kv_increment.c` on one of `kv_slots` 64-byte records.
    Increment,
    /// `bsearch.c` for a key in a file of sorted `u64`s of this many bytes.
    Bsearch { bytes: u64 },
    /// `btree.c` lookup in a tree of this depth.
    Btree { depth: usize },
    /// `filter.c` over 16-byte records: the aggregate (32 bytes) comes back.
    Scan { bytes: u64 },
    /// A program that returns at once, over an empty range: the crossing alone.
    Null,
}

impl Op {
    pub fn label(self) -> String {
        match self {
            Op::Increment => "increment (key-value)".into(),
            Op::Bsearch { bytes } => format!("binary search, {}", size(bytes)),
            Op::Btree { depth } => format!("B+-tree lookup, depth {depth}"),
            Op::Scan { bytes } => format!("scan + aggregate, {}", size(bytes)),
            Op::Null => "null RUN".into(),
        }
    }
}

/// What nearfs is mounted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mount {
    /// The image itself: no network.
    Local,
    /// `nearfs serve --no-appcode`: runs execute in the daemon over the remote device.
    Blocks,
    /// `nearfs serve`: runs execute at the target.
    Target,
}

/// How an operation is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Way {
    /// By the application: `pread`/`pwrite` through the mount, `O_DIRECT`.
    Preads,
    /// One RUN ioctl of the operation's program.
    Run,
}

/// One measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub op: Op,
    pub mount: Mount,
    pub way: Way,
    /// `nbd_delay` of the mount, µs (0 on the local mount).
    pub delay_us: u64,
    pub stats: Stats,
    /// NBD requests (round trips) per operation; none on the local mount.
    pub round_trips: Option<f64>,
    /// Bytes sent and received over NBD per operation.
    pub wire_bytes: Option<f64>,
    /// Reads of the data per operation: `pread`s for the application; for a run, its
    /// invocations (each is given one window of the file).
    pub probes: f64,
}

/// Everything measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub machine: String,
    pub date: String,
    pub plan: Plan,
    pub seconds: f64,
    /// Why the larger sorted file has the size it has.
    pub bsearch_size_reason: String,
    /// Seconds to write each sorted file through the local mount.
    pub bsearch_write_seconds: Vec<f64>,
    pub rows: Vec<Row>,
    pub block: Vec<block::Row>,
    /// Servers or tests not measured, and why.
    pub block_skipped: Vec<String>,
    pub targets: Vec<Target>,
}

/// The compiled programs this benchmark loads on every mount.
const PROGRAMS: [&str; 5] = [
    "../bpf-progs/bsearch.c",
    "../bpf-progs/kv_increment.c",
    "../bpf-progs/btree.c",
    "../bpf-progs/filter.c",
    "progs/null.c",
];

/// The data, written once through a local mount, and the expected answers.
struct Data {
    sorted: Vec<(u64, String)>,
    trees: Vec<Tree>,
    scan: Vec<u8>,
    scan_range: (u64, u64),
    scan_want: [u64; 4],
    objects: HashMap<&'static str, Vec<u8>>,
}

/// The value at index `i` of a sorted file: strictly increasing with gaps, so that
/// `value(i) + 1` is absent.
fn value(i: u64) -> u64 {
    3 * i + 7
}

pub fn measure(plan: &mut Plan, parent: &Path) -> Result<Results> {
    let started = Instant::now();
    let (big, reason) = pick_big_size(plan, parent)?;
    if let Some(b) = big {
        plan.bsearch_bytes.push(b);
    }
    let image_bytes = plan.bsearch_bytes.iter().sum::<u64>() + 2 * GIB;
    let work = Work::create_named(parent, "-remote", image_bytes)?;
    let mut r = Results {
        machine: setup::machine(),
        date: crate::report::today(),
        plan: plan.clone(),
        seconds: 0.0,
        bsearch_size_reason: reason,
        bsearch_write_seconds: Vec::new(),
        rows: Vec::new(),
        block: Vec::new(),
        block_skipped: Vec::new(),
        targets: Vec::new(),
    };

    let data = {
        let m = work.mount(0)?;
        eprintln!("==> remote: writing the data through a local mount");
        let data = prepare(plan, &work, &m, &mut r.bsearch_write_seconds)?;
        eprintln!("==> remote: the same operations on the local mount");
        Session::open(plan, &data, &m, Mount::Local, 0)?.measure_all(&mut r.rows)?;
        data
    };
    for (kind, mount) in [
        (servers::Kind::NearfsBlocks, Mount::Blocks),
        (servers::Kind::Nearfs, Mount::Target),
    ] {
        let server = servers::Server::start(kind, work.nearfs(), &work.image, &work.root)?;
        for &delay in &plan.delays_us {
            eprintln!("==> remote: over {}, nbd_delay={delay} µs", kind.label());
            let m = mount_nbd(&work, &server.url(), delay)?;
            Session::open(plan, &data, &m, mount, delay)?.measure_all(&mut r.rows)?;
        }
    }
    drop(work);

    let dir =
        std::fs::canonicalize(parent)?.join(format!("nearfs-bench.{}-block", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let nearfs = setup::sibling_binary("nearfs")?;
    let measured = block::measure(
        &plan.block,
        &nearfs,
        &dir,
        &[
            servers::Kind::Nearfs,
            servers::Kind::Qemu,
            servers::Kind::Nbdkit,
        ],
        &mut r.block,
        &mut r.block_skipped,
    );
    std::fs::remove_dir_all(&dir).ok();
    measured?;
    r.seconds = started.elapsed().as_secs_f64();
    r.finish();
    Ok(r)
}

/// The larger sorted file: 8 GiB (2^30 values) when the disk has room for it and the rest
/// with 8 GiB to spare for others, else 4 or 2 GiB; in quick mode 64 MiB. Larger files
/// would cost the run more time than it has: they are written through the mount at a few
/// hundred MB/s.
fn pick_big_size(plan: &Plan, parent: &Path) -> Result<(Option<u64>, String)> {
    if plan.mode == "quick" {
        return Ok((Some(64 * MIB), "quick mode".into()));
    }
    let free = free_bytes(parent)?;
    let others = plan.bsearch_bytes.iter().sum::<u64>() + GIB + plan.block.image_bytes;
    let spare = 8 * GIB;
    for size in [8 * GIB, 4 * GIB, 2 * GIB] {
        if others + size + spare <= free {
            return Ok((
                Some(size),
                format!(
                    "{} of sorted u64s: the largest of 8, 4 and 2 GiB that leaves 8 GiB of the \
                     {} free on the disk to others, and at the mount's write speed (timed below) \
                     keeps the whole remote section within about 5 minutes",
                    size_exact(size),
                    size_exact(free)
                ),
            ));
        }
    }
    Ok((
        None,
        format!("no larger file: {} free on the disk", size_exact(free)),
    ))
}

fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs is a struct of integers, for which all zeros is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and `s` is writable; statvfs keeps neither.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", dir.display()));
    }
    Ok(s.f_bavail * s.f_frsize)
}

/// Mounts an NBD export with `nbd_delay`. A mount claims its export; the previous mount's
/// connections may take a moment to close at the server, so a refused claim is retried.
fn mount_nbd<'a>(work: &'a Work, url: &str, delay_us: u64) -> Result<Mounted<'a>> {
    let options = format!("nbd_delay={delay_us}");
    let mut tries = 0;
    loop {
        match work.mount_device(url.as_ref(), &options) {
            Ok(m) => return Ok(m),
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("    mount refused, retrying: {e:#}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes the sorted files, the trees, the records and the counters through a local
/// mount, and compiles the programs.
fn prepare(plan: &Plan, work: &Work, m: &Mounted, write_seconds: &mut Vec<f64>) -> Result<Data> {
    let mut sorted = Vec::new();
    for &bytes in &plan.bsearch_bytes {
        let name = format!("sorted-{bytes}.u64");
        let start = Instant::now();
        write_sorted(&m.path(&name), bytes)?;
        write_seconds.push(start.elapsed().as_secs_f64());
        eprintln!(
            "    {} of sorted u64s in {:.1} s",
            size(bytes),
            start.elapsed().as_secs_f64()
        );
        sorted.push((bytes, name));
    }
    let trees = lookups::write_trees(plan.fill, plan.max_depth, m, None)?;

    let n = plan.scan_bytes / records::SIZE as u64;
    let mut rng = Rng::new(17);
    let scan = records::encode(&(0..n).map(|i| (i, rng.below(VALUES))).collect::<Vec<_>>());
    let hi = ((plan.scan_selectivity * VALUES as f64) as u64).max(1) - 1;
    let scan_want = records::aggregate(&scan, 0, hi);
    std::fs::write(m.path("records.bin"), &scan)?;

    let counters: Vec<u8> = (0..plan.kv_slots)
        .flat_map(|s| kv::record(&crate::rmw::key(s), 0))
        .collect();
    std::fs::write(m.path("counters.kv"), &counters)?;

    let mut objects = HashMap::new();
    for source in PROGRAMS {
        objects.insert(
            source,
            setup::compile(&setup::source_dir(source), &work.objects)?,
        );
    }
    Ok(Data {
        sorted,
        trees,
        scan,
        scan_range: (0, hi),
        scan_want,
        objects,
    })
}

/// `bytes / 8` values `value(0), value(1), …`, written in 8 MiB pieces and synced.
fn write_sorted(path: &Path, bytes: u64) -> Result<()> {
    let f = File::create(path)?;
    let piece = 8 * MIB;
    let mut buf = vec![0u8; piece as usize];
    let mut at = 0;
    while at < bytes {
        let len = piece.min(bytes - at);
        let first = at / 8;
        for (k, w) in buf[..len as usize].chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&value(first + k as u64).to_le_bytes());
        }
        f.write_all_at(&buf[..len as usize], at)?;
        at += len;
    }
    f.sync_all()?;
    Ok(())
}

/// The programs loaded on one mount.
struct Progs {
    bsearch: ProgId,
    kv: ProgId,
    btree: ProgId,
    filter: ProgId,
    null: ProgId,
}

/// One mount with the programs loaded, measuring every operation every way it offers.
struct Session<'a> {
    plan: &'a Plan,
    data: &'a Data,
    m: &'a Mounted<'a>,
    mount: Mount,
    delay_us: u64,
    progs: Progs,
}

/// What one operation did: data reads (`pread`s, or a run's invocations).
type Probes = u64;

impl<'a> Session<'a> {
    fn open(
        plan: &'a Plan,
        data: &'a Data,
        m: &'a Mounted<'a>,
        mount: Mount,
        delay_us: u64,
    ) -> Result<Session<'a>> {
        if mount != Mount::Local {
            let fs = setup::xattr(m.mount_point(), "user.nearfs.fs")?;
            let want = if mount == Mount::Target { "yes" } else { "no" };
            if !fs.contains(&format!("target_offload={want}")) {
                bail!("a mount over {mount:?} should say target_offload={want}: {fs}");
            }
        }
        let f = File::open(m.path("counters.kv"))?;
        let load = |source: &str| {
            nearfs_client::load(&f, &data.objects[source], None)
                .with_context(|| format!("loading {source}"))
        };
        let progs = Progs {
            bsearch: load(PROGRAMS[0])?,
            kv: load(PROGRAMS[1])?,
            btree: load(PROGRAMS[2])?,
            filter: load(PROGRAMS[3])?,
            null: load(PROGRAMS[4])?,
        };
        Ok(Session {
            plan,
            data,
            m,
            mount,
            delay_us,
            progs,
        })
    }

    /// The ways this mount offers: preads and runs on the local mount and at the target,
    /// runs only over a server without appcode (its preads are the same as the target's).
    fn ways(&self) -> &'static [Way] {
        match self.mount {
            Mount::Blocks => &[Way::Run],
            _ => &[Way::Preads, Way::Run],
        }
    }

    fn measure_all(&self, rows: &mut Vec<Row>) -> Result<()> {
        let mut ops = vec![Op::Increment];
        ops.extend(
            self.data
                .sorted
                .iter()
                .map(|&(bytes, _)| Op::Bsearch { bytes }),
        );
        ops.extend(self.data.trees.iter().map(|t| Op::Btree { depth: t.depth }));
        ops.push(Op::Scan {
            bytes: self.data.scan.len() as u64,
        });
        for op in ops {
            for &way in self.ways() {
                let row = match op {
                    Op::Increment => self.increment(way)?,
                    Op::Bsearch { bytes } => self.bsearch(bytes, way)?,
                    Op::Btree { depth } => self.btree(depth, way)?,
                    Op::Scan { .. } => self.scan(way)?,
                    Op::Null => unreachable!("measured once below"),
                };
                rows.push(row);
            }
        }
        if self.mount != Mount::Blocks {
            rows.push(self.null()?);
        }
        Ok(())
    }

    /// Times `op` (after warm-ups) and counts the NBD requests and bytes it caused. With
    /// `file`, checks where the runs on it executed: all at the target, or none.
    fn timed(
        &self,
        op: Op,
        way: Way,
        file: &Path,
        mut once: impl FnMut() -> Result<Probes>,
    ) -> Result<Row> {
        for _ in 0..self.plan.warmup {
            once()?;
        }
        let runs_before = self.runs(file)?;
        let before = self.wire()?;
        let mut lat = Vec::new();
        let mut probes = 0;
        let begin = Instant::now();
        while (lat.len() < self.plan.min_samples || begin.elapsed() < self.plan.cell)
            && lat.len() < MAX_SAMPLES
        {
            let t = Instant::now();
            probes += once()?;
            lat.push(t.elapsed());
        }
        let wall = begin.elapsed();
        let after = self.wire()?;
        let runs_after = self.runs(file)?;
        let n = lat.len() as f64;
        if way == Way::Run {
            let (runs, remote) = (runs_after.0 - runs_before.0, runs_after.1 - runs_before.1);
            let want = if self.mount == Mount::Target { runs } else { 0 };
            if runs != lat.len() as u64 || remote != want {
                bail!(
                    "{} on {:?}: {runs} runs for {} operations, {remote} of them at the target",
                    op.label(),
                    self.mount,
                    lat.len()
                );
            }
        }
        let per_op = |a: Option<(u64, u64)>, b: Option<(u64, u64)>, pick: fn((u64, u64)) -> u64| {
            a.zip(b).map(|(a, b)| (pick(b) - pick(a)) as f64 / n)
        };
        Ok(Row {
            op,
            mount: self.mount,
            way,
            delay_us: self.delay_us,
            stats: measure::summarise(lat, wall, 0),
            round_trips: per_op(before, after, |w| w.0),
            wire_bytes: per_op(before, after, |w| w.1),
            probes: probes as f64 / n,
        })
    }

    /// `(nbd_requests, nbd_bytes)` of the mount so far; none on the local mount.
    fn wire(&self) -> Result<Option<(u64, u64)>> {
        if self.mount == Mount::Local {
            return Ok(None);
        }
        let fs = setup::xattr(self.m.mount_point(), "user.nearfs.fs")?;
        Ok(Some((
            setup::number(&fs, "nbd_requests=")?,
            setup::number(&fs, "nbd_bytes=")?,
        )))
    }

    /// `(runs, remote_runs)` of a file so far.
    fn runs(&self, file: &Path) -> Result<(u64, u64)> {
        Ok((
            setup::file_stat(file, "runs=")?,
            setup::file_stat(file, "remote_runs=")?,
        ))
    }

    fn increment(&self, way: Way) -> Result<Row> {
        let path = self.m.path("counters.kv");
        let before = counters_total(&path)?;
        let file = setup::open(&path, way == Way::Preads, true)?;
        let mut rng = Rng::new(5);
        let mut buf = Aligned::new(BLOCK);
        let mut done = 0u64;
        let row = self.timed(Op::Increment, way, &path, || {
            let slot = rng.below(self.plan.kv_slots);
            let key = crate::rmw::key(slot);
            match way {
                Way::Run => {
                    let arg = kv::arg(slot, &key);
                    let run = Run::new(self.progs.kv).arg(&arg).write(true);
                    let out = nearfs_client::run(&file, &run)?;
                    if out.result as i64 <= 0 {
                        bail!("kv_increment of slot {slot} returned {}", out.result as i64);
                    }
                    done += 1;
                    Ok(out.costs.hops + 1)
                }
                Way::Preads => {
                    // The record's block, whole: O_DIRECT moves aligned blocks.
                    let at = slot * kv::SIZE as u64;
                    let (block, inside) = (
                        at / BLOCK as u64 * BLOCK as u64,
                        (at % BLOCK as u64) as usize,
                    );
                    flock(&file, libc::LOCK_EX)?;
                    let result = (|| -> Result<()> {
                        let b = buf.get();
                        file.read_exact_at(b, block)?;
                        let rec = &mut b[inside..inside + kv::SIZE];
                        if rec[..kv::KEY] != key {
                            bail!("slot {slot} holds another key");
                        }
                        let next = kv::counter(rec) + 1;
                        rec[kv::KEY..].copy_from_slice(&next.to_le_bytes());
                        file.write_all_at(b, block)?;
                        Ok(())
                    })();
                    flock(&file, libc::LOCK_UN)?;
                    result?;
                    done += 1;
                    Ok(1)
                }
            }
        })?;
        let after = counters_total(&path)?;
        if after.checked_sub(before) != Some(done) {
            bail!(
                "increments on {:?}: the counters went from {before} to {after} in {done} increments",
                self.mount
            );
        }
        Ok(row)
    }

    fn bsearch(&self, bytes: u64, way: Way) -> Result<Row> {
        let name = &self
            .data
            .sorted
            .iter()
            .find(|s| s.0 == bytes)
            .context("a sorted file")?
            .1;
        let path = self.m.path(name);
        let file = setup::open(&path, way == Way::Preads, false)?;
        setup::no_readahead(&file);
        let n = bytes / 8;
        let mut rng = Rng::new(bytes ^ 0x5eed);
        let mut buf = Aligned::new(BLOCK);
        self.timed(Op::Bsearch { bytes }, way, &path, || {
            // Every other key is absent (between two values).
            let i = rng.below(n);
            let absent = rng.below(2) == 1;
            let key = value(i) + u64::from(absent);
            let want = (!absent).then_some(i);
            let (got, probes) = match way {
                Way::Run => {
                    let arg = key.to_le_bytes();
                    let out = nearfs_client::run(&file, &Run::new(self.progs.bsearch).arg(&arg))?;
                    let got = (out.result as i64 >= 0).then_some(out.result);
                    (got, out.costs.hops + 1)
                }
                Way::Preads => search_blocks(
                    |b, block| Ok(file.read_exact_at(b, block * BLOCK as u64)?),
                    buf.get(),
                    n,
                    key,
                )?,
            };
            if got != want {
                bail!(
                    "binary search over {} for {key}: {got:?}, not {want:?}",
                    size(bytes)
                );
            }
            Ok(probes)
        })
    }

    fn btree(&self, depth: usize, way: Way) -> Result<Row> {
        let tree = &self.data.trees[depth - 1];
        let path = self.m.path(&tree.name);
        let file = setup::open(&path, way == Way::Preads, false)?;
        setup::no_readahead(&file);
        let mut rng = Rng::new(depth as u64 + 100);
        let mut buf = Aligned::new(btree::NODE);
        self.timed(Op::Btree { depth }, way, &path, || {
            let (key, want, _) = tree.samples[rng.below(tree.samples.len() as u64) as usize];
            let (got, probes) = match way {
                Way::Run => {
                    let arg = key.to_le_bytes();
                    let out = nearfs_client::run(&file, &Run::new(self.progs.btree).arg(&arg))?;
                    (Some(out.result), out.costs.hops + 1)
                }
                Way::Preads => {
                    let mut reads = 0;
                    let got = btree::lookup(
                        |node, at| {
                            reads += 1;
                            let b = buf.get();
                            file.read_exact_at(b, at)?;
                            node.copy_from_slice(b);
                            Ok(())
                        },
                        key,
                    )?;
                    (got, reads)
                }
            };
            if got != Some(want) {
                bail!("B+-tree of depth {depth}: key {key} gave {got:?}, not {want}");
            }
            Ok(probes)
        })
    }

    fn scan(&self, way: Way) -> Result<Row> {
        let path = self.m.path("records.bin");
        let file = setup::open(&path, way == Way::Preads, false)?;
        let (lo, hi) = self.data.scan_range;
        let want = self.data.scan_want;
        let arg = records::arg(lo, hi);
        let mut buf = Aligned::new(SCAN_CHUNK);
        let bytes = self.data.scan.len() as u64;
        self.timed(Op::Scan { bytes }, way, &path, || {
            let (got, probes) = match way {
                Way::Run => {
                    let out = nearfs_client::run(&file, &Run::new(self.progs.filter).arg(&arg))?;
                    let words = nearfs_client::layouts::words(&out.output);
                    (words.try_into().unwrap_or([0; 4]), out.costs.hops + 1)
                }
                Way::Preads => read_and_filter(&file, buf.get(), lo, hi)?,
            };
            if got != want {
                bail!("scan: {got:?}, not {want:?}");
            }
            Ok(probes)
        })
    }

    fn null(&self) -> Result<Row> {
        let path = self.m.path("counters.kv");
        let file = File::open(&path)?;
        self.timed(Op::Null, Way::Run, &path, || {
            let out = nearfs_client::run(&file, &Run::new(self.progs.null).range(0, 0))?;
            if out.result != 0 {
                bail!("the null program returned {}", out.result);
            }
            Ok(out.costs.hops + 1)
        })
    }
}

fn flock(file: &File, op: i32) -> Result<()> {
    // SAFETY: flock takes a descriptor we hold open and a number.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// The sum of all counters, read with O_DIRECT (the page cache may hold an old copy).
fn counters_total(path: &Path) -> Result<u64> {
    let f = setup::open(path, true, false)?;
    let len = f.metadata()?.len() as usize;
    let mut buf = Aligned::new(len.div_ceil(BLOCK) * BLOCK);
    let b = buf.get();
    let mut got = 0;
    while got < len {
        match f.read_at(&mut b[got..], got as u64)? {
            0 => break,
            k => got += k,
        }
    }
    Ok(b[..len].chunks_exact(kv::SIZE).map(kv::counter).sum())
}

/// A binary search as an application does it with aligned reads: read the block holding
/// the middle candidate; finish inside it if the key's place is there, else drop the
/// block and everything on the wrong side of it. Returns the key's index and the reads.
fn search_blocks(
    mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
    buf: &mut [u8],
    n: u64,
    key: u64,
) -> Result<(Option<u64>, Probes)> {
    let (mut lo, mut hi, mut probes) = (0, n, 0);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let block = mid / PER_BLOCK;
        let first = block * PER_BLOCK;
        let count = PER_BLOCK.min(n - first) as usize;
        read(buf, block)?;
        probes += 1;
        let at = |k: usize| u64::from_le_bytes(buf[8 * k..8 * k + 8].try_into().unwrap());
        if key < at(0) {
            hi = hi.min(first);
        } else if key > at(count - 1) {
            lo = lo.max(first + count as u64);
        } else {
            let (mut l, mut h) = (0, count);
            while l < h {
                let m = (l + h) / 2;
                if at(m) < key { l = m + 1 } else { h = m }
            }
            return Ok(((at(l) == key).then_some(first + l as u64), probes));
        }
    }
    Ok((None, probes))
}

/// Reads the whole file in aligned pieces and aggregates as `filter.c` does.
fn read_and_filter(f: &File, buf: &mut [u8], lo: u64, hi: u64) -> Result<([u64; 4], Probes)> {
    let mut agg = [0, 0, u64::MAX, 0];
    let (mut at, mut reads) = (0u64, 0);
    loop {
        let k = f.read_at(buf, at)?;
        if k == 0 {
            break;
        }
        reads += 1;
        let part = records::aggregate(&buf[..k], lo, hi);
        agg[0] += part[0];
        agg[1] = agg[1].wrapping_add(part[1]);
        agg[2] = agg[2].min(part[2]);
        agg[3] = agg[3].max(part[3]);
        at += k as u64;
    }
    Ok((agg, reads))
}

/// 1073741824 → "1 GiB", 16777216 → "16 MiB".
fn size(bytes: u64) -> String {
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} B")
    }
}

fn size_exact(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(n: u64) -> Vec<u8> {
        (0..n).flat_map(|i| value(i).to_le_bytes()).collect()
    }

    #[test]
    fn block_search_finds_present_keys_and_no_absent_ones() {
        for n in [1, 5, 512, 513, 4000, 70_000] {
            let file = sorted(n);
            let mut buf = vec![0u8; BLOCK];
            let read = |b: &mut [u8], block: u64| {
                let at = (block * BLOCK as u64) as usize;
                let end = (at + BLOCK).min(file.len());
                b.fill(0);
                b[..end - at].copy_from_slice(&file[at..end]);
                Ok(())
            };
            for i in (0..n).step_by((n as usize / 97).max(1)).chain([n - 1]) {
                let (got, probes) = search_blocks(read, &mut buf, n, value(i)).unwrap();
                assert_eq!(got, Some(i), "n={n} i={i}");
                assert!(probes <= 64 - (n / PER_BLOCK).leading_zeros() as u64 + 2);
                let (got, _) = search_blocks(read, &mut buf, n, value(i) + 1).unwrap();
                assert_eq!(got, None, "n={n} absent after {i}");
            }
            assert_eq!(search_blocks(read, &mut buf, n, 0).unwrap().0, None);
            assert_eq!(search_blocks(read, &mut buf, n, u64::MAX).unwrap().0, None);
        }
    }

    #[test]
    fn sizes_are_named_in_binary_units() {
        assert_eq!(size(GIB), "1 GiB");
        assert_eq!(size(8 * GIB), "8 GiB");
        assert_eq!(size(16 * MIB), "16 MiB");
        assert_eq!(size(100), "100 B");
    }
}
