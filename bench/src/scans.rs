//! Scans: filter and aggregate over a file of 16-byte records at selectivities from 0.01 %
//! to 100 %, inside the daemon against reading the file into the application.

use std::fs::File;
use std::io::Read;

use anyhow::{Result, bail};
use nearfs_client::layouts::{Rng, records};
use nearfs_client::{Run, abi};
use serde::{Deserialize, Serialize};

use crate::Plan;
use crate::measure::{self, Stats};
use crate::setup::{self, Mounted, Work};

/// Values are uniform below this, so `[0, s × VALUES)` selects a fraction `s` of records.
const VALUES: u64 = 1_000_000;
/// What the application reads at a time.
const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Way {
    /// `filter.c`: the aggregate (32 bytes) comes back.
    OffloadAggregate,
    /// `bench/progs/select.c`: every matching record comes back.
    OffloadSelect,
    /// `read()` through the mount with the file not in the page cache, then the same filter
    /// in the application.
    MountRead,
    /// The same with the file in the page cache.
    MountCached,
    /// `read()` of a copy on the host filesystem, from its page cache.
    HostCached,
}

impl Way {
    pub const ALL: [Way; 5] = [
        Way::OffloadAggregate,
        Way::OffloadSelect,
        Way::MountRead,
        Way::MountCached,
        Way::HostCached,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Way::OffloadAggregate => "offload, aggregate returned",
            Way::OffloadSelect => "offload, matching records returned",
            Way::MountRead => "read() via mount + filter",
            Way::MountCached => "read() via mount, page cache + filter",
            Way::HostCached => "read() on host fs, page cache + filter",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub selectivity: f64,
    pub way: Way,
    /// Bytes of the file scanned.
    pub file_bytes: u64,
    /// Bytes that crossed into the application.
    pub returned_bytes: u64,
    /// File bytes per second, at the median time.
    pub gb_per_sec: f64,
    pub stats: Stats,
}

pub fn measure(plan: &Plan, work: &Work, m: &Mounted, rows: &mut Vec<Row>) -> Result<()> {
    let n = plan.scan_bytes / records::SIZE as u64;
    let mut rng = Rng::new(7);
    let data = records::encode(&(0..n).map(|i| (i, rng.below(VALUES))).collect::<Vec<_>>());
    let (on_mount, on_host) = (m.path("records.bin"), work.host.join("records.bin"));
    std::fs::write(&on_mount, &data)?;
    std::fs::write(&on_host, &data)?;
    let file = File::open(&on_mount)?;
    let filter = work.load(&file, "../bpf-progs/filter.c")?;
    let select = work.load(&file, "progs/select.c")?;
    for &selectivity in &plan.selectivities {
        let (lo, hi) = (0, ((selectivity * VALUES as f64) as u64).max(1) - 1);
        let want = records::aggregate(&data, lo, hi);
        let arg = records::arg(lo, hi);
        for way in Way::ALL {
            let mut returned = 0;
            let mut check = |got: [u64; 4], bytes: u64| -> Result<()> {
                if got != want {
                    bail!("{}: {got:?}, not {want:?}", way.label());
                }
                returned = bytes;
                Ok(())
            };
            let stats = measure::repeat(plan.scan_repeats, || match way {
                Way::OffloadAggregate => {
                    let out = nearfs_client::run(&file, &Run::new(filter).arg(&arg))?;
                    let words = nearfs_client::layouts::words(&out.output);
                    check(
                        words.try_into().unwrap_or_default(),
                        out.output.len() as u64,
                    )
                }
                Way::OffloadSelect => {
                    // Output comes in 8 KiB pieces: the large RUN's reply holds the first.
                    let run = Run::new(select).arg(&arg).expect_output(abi::OUT_CHUNK);
                    let out = nearfs_client::run(&file, &run)?;
                    // The selected records, aggregated here, must give the same answer.
                    check(
                        records::aggregate(&out.output, lo, hi),
                        out.output.len() as u64,
                    )?;
                    if out.result != want[0] || out.output.len() as u64 != want[0] * 16 {
                        bail!("select returned {} records, not {}", out.result, want[0]);
                    }
                    Ok(())
                }
                Way::MountRead | Way::MountCached | Way::HostCached => {
                    let path = if way == Way::HostCached {
                        &on_host
                    } else {
                        &on_mount
                    };
                    let mut f = File::open(path)?;
                    if way == Way::MountRead {
                        setup::drop_cache(&f);
                    }
                    let (got, bytes) = read_and_filter(&mut f, lo, hi)?;
                    check(got, bytes)
                }
            })?;
            let gb_per_sec = data.len() as f64 / stats.median_us / 1e3;
            rows.push(Row {
                selectivity,
                way,
                file_bytes: data.len() as u64,
                returned_bytes: returned,
                gb_per_sec,
                stats,
            });
        }
    }
    nearfs_client::unload(&file, filter)?;
    nearfs_client::unload(&file, select)?;
    Ok(())
}

/// What an application does without offload: reads the file a chunk at a time and filters
/// it. Returns the aggregate and the bytes read.
fn read_and_filter(f: &mut File, lo: u64, hi: u64) -> Result<([u64; 4], u64)> {
    let mut buf = vec![0u8; CHUNK];
    let mut agg = [0, 0, u64::MAX, 0];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < CHUNK {
            match f.read(&mut buf[filled..])? {
                0 => break,
                k => filled += k,
            }
        }
        if filled == 0 {
            break;
        }
        total += filled as u64;
        let part = records::aggregate(&buf[..filled], lo, hi);
        agg[0] += part[0];
        agg[1] = agg[1].wrapping_add(part[1]);
        agg[2] = agg[2].min(part[2]);
        agg[3] = agg[3].max(part[3]);
    }
    Ok((agg, total))
}
