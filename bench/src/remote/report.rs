//! The remote section's targets and Markdown tables, from [`Results`] alone (so that
//! `--replot` draws the same).

use std::fmt::Write;
use std::path::Path;

use super::block::{self, Test};
use super::servers::Kind;
use super::{Mount, Op, Results, Row, Way, size};
use crate::report::{Target, bytes, targets_table};

/// The markers of the remote block in the benchmarks document.
pub const BEGIN: &str = "<!-- bench-remote:begin -->";
pub const END: &str = "<!-- bench-remote:end -->";

/// The three ways of seed 002's Figure 1, as the tables name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure1 {
    /// (i) `pread`s (and `pwrite`s) by the application through the mount.
    Preads,
    /// (ii) the run in the daemon over the remote device.
    Daemon,
    /// (iii) the run at the target.
    Target,
}

impl Figure1 {
    pub const ALL: [Figure1; 3] = [Figure1::Preads, Figure1::Daemon, Figure1::Target];

    pub fn label(self) -> &'static str {
        match self {
            Figure1::Preads => "(i) preads via mount",
            Figure1::Daemon => "(ii) run in daemon over NBD",
            Figure1::Target => "(iii) run at the target",
        }
    }

    fn at(self) -> (Mount, Way) {
        match self {
            Figure1::Preads => (Mount::Target, Way::Preads),
            Figure1::Daemon => (Mount::Blocks, Way::Run),
            Figure1::Target => (Mount::Target, Way::Run),
        }
    }
}

impl Results {
    pub fn row(&self, op: Op, mount: Mount, way: Way, delay_us: u64) -> Option<&Row> {
        let delay_us = if mount == Mount::Local { 0 } else { delay_us };
        self.rows
            .iter()
            .find(|r| r.op == op && r.mount == mount && r.way == way && r.delay_us == delay_us)
    }

    pub fn way(&self, op: Op, way: Figure1, delay_us: u64) -> Option<&Row> {
        let (mount, w) = way.at();
        self.row(op, mount, w, delay_us)
    }

    pub fn way_us(&self, op: Op, way: Figure1, delay_us: u64) -> Option<f64> {
        self.way(op, way, delay_us).map(|r| r.stats.median_us)
    }

    /// The operations measured, in the order they ran (the null RUN left out).
    pub fn ops(&self) -> Vec<Op> {
        let mut ops: Vec<Op> = Vec::new();
        for r in &self.rows {
            if r.op != Op::Null && !ops.contains(&r.op) {
                ops.push(r.op);
            }
        }
        ops
    }

    fn local_run_us(&self, op: Op) -> Option<f64> {
        self.row(op, Mount::Local, Way::Run, 0)
            .map(|r| r.stats.median_us)
    }

    /// One round trip to the target as an offload sees it: a null RUN at the target less
    /// a null RUN on the local mount.
    pub fn rtt_us(&self, delay_us: u64) -> Option<f64> {
        Some(
            self.row(Op::Null, Mount::Target, Way::Run, delay_us)?
                .stats
                .median_us
                - self.local_run_us(Op::Null)?,
        )
    }

    /// What a run at the target cannot beat: one round trip plus the same run next to
    /// its device (on the local mount: its device reads and its execution).
    pub fn floor_us(&self, op: Op, delay_us: u64) -> Option<f64> {
        Some(self.local_run_us(op)? + self.rtt_us(delay_us)?)
    }

    /// The delay standing for the seed's network (the largest measured).
    pub fn seed_delay(&self) -> u64 {
        self.plan.delays_us.iter().copied().max().unwrap_or(0)
    }

    fn speedup(&self, op: Op, delay_us: u64) -> Option<(f64, f64, f64)> {
        let preads = self.way_us(op, Figure1::Preads, delay_us)?;
        let target = self.way_us(op, Figure1::Target, delay_us)?;
        Some((preads / target, preads, target))
    }

    /// Computes the targets once everything is measured.
    pub fn finish(&mut self) {
        let mut targets = Vec::new();
        let d = self.seed_delay();
        let first = Op::Bsearch {
            bytes: self.plan.bsearch_bytes[0],
        };
        for (op, want, what) in [
            (
                first,
                10.0,
                format!(
                    "binary search over {}, nbd_delay={d}: preads via mount / run at the target",
                    size(self.plan.bsearch_bytes[0])
                ),
            ),
            (
                Op::Increment,
                1.8,
                format!(
                    "increment, nbd_delay={d}: flock + pread + pwrite via mount / run at the target"
                ),
            ),
        ] {
            if let Some((ratio, preads, target)) = self.speedup(op, d) {
                targets.push(Target {
                    what,
                    want: format!("≥ {want}×"),
                    measured: format!("{ratio:.2}× ({preads:.1} / {target:.1} µs)"),
                    met: ratio >= want,
                });
            }
        }
        for &delay in &self.plan.delays_us {
            let worst = self
                .ops()
                .into_iter()
                .filter_map(|op| {
                    let target = self.way_us(op, Figure1::Target, delay)?;
                    Some((target / self.floor_us(op, delay)?, op))
                })
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((ratio, op)) = worst {
                targets.push(Target {
                    what: format!(
                        "run at the target / (one round trip + the run on a local mount), \
                         nbd_delay={delay}, worst operation"
                    ),
                    want: "≤ 1.3×".into(),
                    measured: format!("{ratio:.2}× ({})", op.label()),
                    met: ratio <= 1.3,
                });
            }
        }
        self.targets = targets;
    }

    pub fn markdown(&self, images: &Path) -> String {
        let mut s = String::new();
        let img = |name: &str| images.join(name).display().to_string();
        let p = &self.plan;
        let sorted: Vec<String> = p.bsearch_bytes.iter().map(|&b| size(b)).collect();
        let _ = writeln!(
            s,
            "Machine: {}; {}; {} mode ({:.0} s). Loopback; each figure is the median (p99) of one \
             thread's operations over at least {:.2} s and {} operations, after {} warm-ups. \
             Binary search over {} of sorted u64s; B+-trees of 4 KiB nodes holding {} keys; \
             increments of {} records; a scan of {} of records, {} % matching. fio: {} requests \
             in flight on one connection, {:.1} s after {:.1} s of ramp, over a {} image.\n",
            self.machine,
            self.date,
            p.mode,
            self.seconds,
            p.cell.as_secs_f64(),
            p.min_samples,
            p.warmup,
            sorted.join(" and "),
            p.fill,
            p.kv_slots,
            size(p.scan_bytes),
            p.scan_selectivity * 100.0,
            p.block.iodepth,
            p.block.runtime.as_secs_f64(),
            p.block.ramp.as_secs_f64(),
            size(p.block.image_bytes),
        );
        let written: Vec<String> = p
            .bsearch_bytes
            .iter()
            .zip(&self.bsearch_write_seconds)
            .map(|(&b, t)| format!("{} in {t:.1} s", size(b)))
            .collect();
        let _ = writeln!(
            s,
            "The larger sorted file: {}. Written through the local mount: {}.\n",
            self.bsearch_size_reason,
            written.join(", ")
        );

        targets_table(&mut s, &self.targets);

        self.figure1(&mut s, &img);
        self.floors(&mut s);
        self.block_table(&mut s);
        s
    }

    fn figure1(&self, s: &mut String, img: &dyn Fn(&str) -> String) {
        let _ = writeln!(
            s,
            "\n### Figure 1, measured\n\nMedian (p99) µs per operation. Round trips and bytes \
             on the wire are per operation, from the mount's `nbd_requests=` and `nbd_bytes=`. \
             \"reads\" are data reads per operation: the application's `pread`s, and a run's \
             invocations (each is given one 4 KiB window of the file; `kv_increment` reads its \
             record with a helper in its one invocation).\n\n\
             ![latency against round trips]({})\n\n![B+-tree lookups]({})\n",
            img("remote-round-trips.png"),
            img("remote-btree.png")
        );
        let cell = |r: Option<&Row>| {
            r.map_or("–".to_string(), |r| {
                format!("{:.1} ({:.0})", r.stats.median_us, r.stats.p99_us)
            })
        };
        for &d in &self.plan.delays_us {
            let note = if d == 0 {
                " (loopback alone)"
            } else {
                " (seed 002 measured 41.9 µs)"
            };
            let _ = writeln!(
                s,
                "**nbd_delay={d} µs per round trip{note}.**\n\n| operation | {} | {} | {} | \
                 (i) / (iii) | (ii) / (iii) | round trips (i) · (ii) · (iii) | bytes on the wire \
                 (i) · (ii) · (iii) | reads (i) · (iii) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                Figure1::Preads.label(),
                Figure1::Daemon.label(),
                Figure1::Target.label(),
            );
            for op in self.ops() {
                let rows = Figure1::ALL.map(|w| self.way(op, w, d));
                let ratio = |a: Option<&Row>, b: Option<&Row>| {
                    a.zip(b).map_or("–".into(), |(a, b)| {
                        format!("{:.2}×", a.stats.median_us / b.stats.median_us)
                    })
                };
                let trips: Vec<String> = rows
                    .iter()
                    .map(|r| {
                        r.and_then(|r| r.round_trips)
                            .map_or("–".into(), |t| format!("{t:.1}"))
                    })
                    .collect();
                let wire: Vec<String> = rows
                    .iter()
                    .map(|r| {
                        r.and_then(|r| r.wire_bytes)
                            .map_or("–".into(), |b| bytes(b.round() as u64))
                    })
                    .collect();
                let probes =
                    |r: Option<&Row>| r.map_or("–".into(), |r| format!("{:.1}", r.probes));
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} · {} |",
                    op.label(),
                    cell(rows[0]),
                    cell(rows[1]),
                    cell(rows[2]),
                    ratio(rows[0], rows[2]),
                    ratio(rows[1], rows[2]),
                    trips.join(" · "),
                    wire.join(" · "),
                    probes(rows[0]),
                    probes(rows[2]),
                );
            }
            s.push('\n');
        }
    }

    fn floors(&self, s: &mut String) {
        let rtts: Vec<String> = self
            .plan
            .delays_us
            .iter()
            .map(|&d| {
                self.rtt_us(d).map_or(format!("– at nbd_delay={d}"), |t| {
                    format!("{t:.1} µs at nbd_delay={d}")
                })
            })
            .collect();
        let _ = writeln!(
            s,
            "### The run at the target against its floor\n\nFloor = one round trip + the same \
             run on a local mount of the image (nearfs over the image file itself: the run's \
             device reads and execution next to its device, with the same program and keys). \
             One round trip is a null RUN at the target less a null RUN on the local mount: {}. \
             Null RUN on the local mount: {}.\n",
            rtts.join(", "),
            self.row(Op::Null, Mount::Local, Way::Run, 0)
                .map_or("–".into(), |r| format!(
                    "{:.1} ({:.0}) µs",
                    r.stats.median_us, r.stats.p99_us
                ))
        );
        let _ = write!(
            s,
            "| operation | preads on local mount | run on local mount |"
        );
        let mut rule = String::from("|---|---:|---:|");
        for &d in &self.plan.delays_us {
            let _ = write!(
                s,
                " floor, {d} µs | at target, {d} µs | target / floor, {d} µs |"
            );
            rule.push_str("---:|---:|---:|");
        }
        let _ = writeln!(s, "\n{rule}");
        for op in self.ops() {
            let local = |way| {
                self.row(op, Mount::Local, way, 0).map_or("–".into(), |r| {
                    format!("{:.1} ({:.0})", r.stats.median_us, r.stats.p99_us)
                })
            };
            let _ = write!(
                s,
                "| {} | {} | {} |",
                op.label(),
                local(Way::Preads),
                local(Way::Run)
            );
            for &d in &self.plan.delays_us {
                let floor = self.floor_us(op, d);
                let target = self.way_us(op, Figure1::Target, d);
                let f = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.1}"));
                let ratio = floor
                    .zip(target)
                    .map_or("–".into(), |(f, t)| format!("{:.2}×", t / f));
                let _ = write!(s, " {} | {} | {ratio} |", f(floor), f(target));
            }
            s.push('\n');
        }
    }

    fn block_table(&self, s: &mut String) {
        let servers = [Kind::Nearfs, Kind::Qemu, Kind::Nbdkit];
        let _ = writeln!(
            s,
            "\n### Plain block service: fio's nbd engine\n\nThe same image file served by each \
             server in turn, fio connecting to `nbd://127.0.0.1:PORT/bench` \
             (`--ioengine=nbd`). In brackets, the median / p99 completion latency.\n\n| test | {} | \
             nearfs serve / best other |\n|---|{}---:|",
            servers.map(|k| k.label()).join(" | "),
            "---:|".repeat(servers.len())
        );
        for test in Test::ALL {
            let get = |k: Kind| self.block.iter().find(|r| r.server == k && r.test == test);
            let cells: Vec<String> = servers
                .iter()
                .map(|&k| {
                    get(k).map_or("–".into(), |r: &block::Row| {
                        format!(
                            "{:.0} {} ({:.0} / {:.0} µs)",
                            test.figure(r),
                            test.unit(),
                            r.p50_us,
                            r.p99_us
                        )
                    })
                })
                .collect();
            let best_other = servers[1..]
                .iter()
                .filter_map(|&k| get(k).map(|r| test.figure(r)))
                .max_by(f64::total_cmp);
            let share = get(Kind::Nearfs)
                .map(|r| test.figure(r))
                .zip(best_other)
                .map_or("–".into(), |(n, b)| format!("{:.0} %", n / b * 100.0));
            let _ = writeln!(s, "| {} | {} | {share} |", test.label(), cells.join(" | "));
        }
        if !self.block_skipped.is_empty() {
            let _ = writeln!(s, "\nNot measured: {}.", self.block_skipped.join("; "));
        }
    }
}
