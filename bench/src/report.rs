//! Results: what `results.json` holds, the targets as ratios from this one run, and the
//! Markdown tables.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::overheads::Overheads;
use crate::{Plan, concurrency, lookups, remote, rmw, scans, setup};

pub const BEGIN: &str = "<!-- bench:begin -->";
pub const END: &str = "<!-- bench:end -->";

#[derive(Serialize, Deserialize)]
pub struct Results {
    pub machine: String,
    pub date: String,
    pub plan: Plan,
    pub seconds: f64,
    pub lookups: Vec<lookups::Row>,
    pub scans: Vec<scans::Row>,
    pub rmw: Vec<rmw::Row>,
    /// The crossing alone, the ioctls measured in turns.
    #[serde(default)]
    pub crossings: Option<lookups::Crossings>,
    /// Work on different files at once (`concurrency.rs`).
    #[serde(default)]
    pub apart: Option<concurrency::Results>,
    pub overheads: Option<Overheads>,
    pub targets: Vec<Target>,
    /// The remote section (`remote.rs`), when it was measured.
    #[serde(default)]
    pub remote: Option<remote::Results>,
}

/// A target of the benchmark issue and what this run measured against it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub what: String,
    pub want: String,
    pub measured: String,
    pub met: bool,
}

impl Results {
    pub fn new(plan: &Plan) -> Results {
        Results {
            machine: setup::machine(),
            date: today(),
            plan: plan.clone(),
            seconds: 0.0,
            lookups: Vec::new(),
            scans: Vec::new(),
            rmw: Vec::new(),
            crossings: None,
            apart: None,
            overheads: None,
            targets: Vec::new(),
            remote: None,
        }
    }

    /// Whether the local section was measured (`--only remote` leaves it out).
    pub fn has_local(&self) -> bool {
        !self.lookups.is_empty()
    }

    /// The measurement of a lookup way at a device latency, depth and thread count; ways
    /// that read no tree or that the device does not reach are found whatever those are.
    pub fn lookup(
        &self,
        device_us: u64,
        depth: usize,
        way: lookups::Way,
        threads: usize,
    ) -> Option<&lookups::Row> {
        let depth = if way.per_depth() { depth } else { 0 };
        let device_us = if self.device_reaches(way) {
            device_us
        } else {
            0
        };
        self.lookups.iter().find(|r| {
            r.device_us == device_us && r.depth == depth && r.way == way && r.threads == threads
        })
    }

    /// The median latency of one lookup way, one thread.
    pub fn lookup_us(&self, device_us: u64, depth: usize, way: lookups::Way) -> Option<f64> {
        self.lookup(device_us, depth, way, 1)
            .map(|r| r.stats.median_us)
    }

    /// Whether a lookup way was measured at every device latency (the others only once).
    fn device_reaches(&self, way: lookups::Way) -> bool {
        self.lookups.iter().any(|r| r.way == way && r.device_us > 0)
    }

    /// The floor of an offload lookup: one crossing (a null RUN) and `depth` device reads.
    pub fn floor_us(&self, device_us: u64, depth: usize) -> Option<f64> {
        Some(
            self.lookup_us(device_us, depth, lookups::Way::NullRun)?
                + self.lookup_us(device_us, depth, lookups::Way::RawDevice)?,
        )
    }

    /// From which depth offload beats one `pread` per level through the mount.
    fn crossover(&self, device_us: u64) -> String {
        use lookups::Way;
        let speedup = |d| {
            Some(
                self.lookup_us(device_us, d, Way::MountDirect)?
                    / self.lookup_us(device_us, d, Way::Offload)?,
            )
        };
        let depths = 1..=self.plan.max_depth;
        let wins: Vec<usize> = depths
            .clone()
            .filter(|&d| speedup(d).is_some_and(|x| x > 1.0))
            .collect();
        let deepest = speedup(self.plan.max_depth).unwrap_or(0.0);
        match wins.first() {
            None => format!(
                "Offload is not faster than preads via the mount at any depth (at depth {}: {deepest:.2}×).",
                self.plan.max_depth
            ),
            Some(&first) if wins.len() == depths.count() + 1 - first => format!(
                "Offload is faster than preads via the mount from depth {first} on ({deepest:.2}× at depth {}).",
                self.plan.max_depth
            ),
            Some(_) => format!(
                "Offload is faster than preads via the mount at depths {wins:?} ({deepest:.2}× at depth {}).",
                self.plan.max_depth
            ),
        }
    }

    /// Computes the targets once everything is measured.
    pub fn finish(&mut self) {
        use lookups::Way;
        let mut targets = Vec::new();
        for (depth, want) in [(4, 3.0), (6, 6.0)] {
            let ratio = self
                .lookup_us(0, depth, Way::MountDirect)
                .zip(self.lookup_us(0, depth, Way::Offload));
            if let Some((preads, offload)) = ratio {
                targets.push(Target {
                    what: format!("depth-{depth} lookup: {depth} preads via mount / offload"),
                    want: format!("≥ {want}×"),
                    measured: format!("{:.2}× ({preads:.1} / {offload:.1} µs)", preads / offload),
                    met: preads / offload >= want,
                });
            }
        }
        for &device_us in &self.plan.device_us {
            let worst = (1..=self.plan.max_depth)
                .filter_map(|d| {
                    let offload = self.lookup_us(device_us, d, Way::Offload)?;
                    Some((offload / self.floor_us(device_us, d)?, d))
                })
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((ratio, depth)) = worst {
                targets.push(Target {
                    what: format!(
                        "offload / (null RUN + d raw device reads), device +{device_us} µs, worst depth"
                    ),
                    want: "≤ 1.3×".into(),
                    measured: format!("{ratio:.2}× (depth {depth})"),
                    met: ratio <= 1.3,
                });
            }
        }
        if let Some(c) = &self.crossings {
            let (null, version) = (c.null_small.median_us, c.version.median_us);
            targets.push(Target {
                what: "null RUN ioctl / VERSION ioctl, measured in turns".into(),
                want: "≤ 1.1×".into(),
                measured: format!("{:.2}× ({null:.1} / {version:.1} µs)", null / version),
                met: null / version <= 1.1,
            });
        }
        let slowest = self
            .scans
            .iter()
            .filter(|r| r.way == scans::Way::OffloadAggregate)
            .map(|r| r.gb_per_sec)
            .min_by(f64::total_cmp);
        if let Some(gbs) = slowest {
            targets.push(Target {
                what: "offloaded scan over cached data (filter + aggregate), slowest selectivity"
                    .into(),
                want: "≥ 2 GB/s".into(),
                measured: format!("{gbs:.2} GB/s"),
                met: gbs >= 2.0,
            });
        }
        for (workers, want) in [(1, 1.3), (4, 3.0)] {
            let rate = |way| {
                self.rmw
                    .iter()
                    .find(|r| r.way == way && r.workers == workers)
                    .map(|r| r.stats.ops_per_sec)
            };
            if let (Some(o), Some(rw)) = (rate(rmw::Way::Offload), rate(rmw::Way::ReadWrite)) {
                targets.push(Target {
                    what: format!(
                        "writing runs / flock + pread + pwrite, {workers} worker{}",
                        if workers == 1 { "" } else { "s" }
                    ),
                    want: format!("≥ {want}×"),
                    measured: format!("{:.2}× ({o:.0} / {rw:.0} per s)", o / rw),
                    met: o / rw >= want,
                });
            }
        }
        if let Some(a) = &self.apart {
            use concurrency::Background;
            let p99 = |b| a.contention(b).map(|s| s.p99_us);
            if let (Some(w), Some(r)) = (p99(Background::Writes), p99(Background::Reads)) {
                targets.push(Target {
                    what: "4 KiB reads of a file: p99 while another file is written / while it is read"
                        .into(),
                    want: "≤ 1.5×".into(),
                    measured: format!("{:.2}× ({w:.0} / {r:.0} µs)", w / r),
                    met: w / r <= 1.5,
                });
            }
            if let (Some(two), Some(one)) = (a.scaling(2), a.scaling(1)) {
                let x = two.ops_per_sec / one.ops_per_sec;
                targets.push(Target {
                    what: "offloaded lookups on different files: 2 threads / 1 thread".into(),
                    want: "≥ 1.7×".into(),
                    measured: format!(
                        "{x:.2}× ({:.0} / {:.0} per s)",
                        two.ops_per_sec, one.ops_per_sec
                    ),
                    met: x >= 1.7,
                });
            }
        }
        if let Some(o) = &self.overheads {
            let slowest = o.verification.iter().max_by(|a, b| a.ms.total_cmp(&b.ms));
            if let Some(v) = slowest {
                targets.push(Target {
                    what: "verification time, slowest example program".into(),
                    want: "< 50 ms".into(),
                    measured: format!("{:.1} ms ({})", v.ms, v.program),
                    met: v.ms < 50.0,
                });
            }
            targets.push(Target {
                what: "setting up a run (checked engine)".into(),
                want: "< 1 µs".into(),
                measured: format!("{:.0} ns", o.setup_ns[0]),
                met: o.setup_ns[0] < 1000.0,
            });
            if let Some(lookup) = o.engines.first() {
                let ratio = lookup.us[0] / lookup.us[1];
                targets.push(Target {
                    what: format!(
                        "runtime time per lookup, checked engine / unchecked JIT ({})",
                        lookup.workload
                    ),
                    want: "≤ 1.3×".into(),
                    measured: format!("{ratio:.2}× ({:.2} / {:.2} µs)", lookup.us[0], lookup.us[1]),
                    met: ratio <= 1.3,
                });
            }
        }
        self.targets = targets;
    }

    /// The tables, with plots linked from `images` (a directory, relative to the document).
    pub fn markdown(&self, images: &Path) -> String {
        let mut s = String::new();
        let img = |name: &str| images.join(name).display().to_string();
        let p = &self.plan;
        let _ = writeln!(
            s,
            "Machine: {}; {}; {} mode ({:.0} s): each lookup and read-modify-write figure runs {:.2} s, \
             B+-tree nodes of 4 KiB holding {} keys, {} MiB of records scanned {} times.\n",
            self.machine,
            self.date,
            p.mode,
            self.seconds,
            p.cell.as_secs_f64(),
            p.fill,
            p.scan_bytes >> 20,
            p.scan_repeats
        );

        targets_table(&mut s, &self.targets);

        self.lookup_tables(&mut s, &img);
        self.scan_table(&mut s, &img);
        self.rmw_table(&mut s, &img);
        if let Some(a) = &self.apart {
            apart_tables(&mut s, a);
        }
        if let Some(o) = &self.overheads {
            overhead_tables(&mut s, o);
        }
        s
    }

    fn lookup_tables(&self, s: &mut String, img: &dyn Fn(&str) -> String) {
        use lookups::Way;
        let _ = writeln!(
            s,
            "\n### Dependent lookups\n\nMedian (p99) µs of one lookup, one thread. \"in daemon\" is the mean time \
             the daemon spent on each offloaded lookup (`run_ns` of `user.nearfs.stats`); the rest is the \
             crossing. \"floor\" is a null RUN ioctl plus the lookup's device reads done directly.\n\n\
             ![lookup latency]({})\n",
            img("lookup-latency.png")
        );
        let cell = |device_us: u64, depth: usize, way: Way| {
            self.lookup(device_us, depth, way, 1)
                .map_or("–".to_string(), |r| {
                    format!("{:.1} ({:.0})", r.stats.median_us, r.stats.p99_us)
                })
        };
        let daemon = |device_us: u64, depth: usize, way: Way| {
            self.lookup(device_us, depth, way, 1)
                .and_then(|r| r.daemon_us)
                .map_or("–".to_string(), |us| format!("{us:.1}"))
        };
        for &device_us in &self.plan.device_us {
            let _ = writeln!(
                s,
                "**Device +{device_us} µs per access.**\n\n| depth | offload | in daemon | preads via mount | speedup | floor | \
                 offload / floor | 64 keys per ioctl, per key | via mount, page cache | host fs, page cache | \
                 host fs, O_DIRECT |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for d in 1..=self.plan.max_depth {
                let ratio = |a: Option<f64>, b: Option<f64>| {
                    a.zip(b)
                        .map_or("–".into(), |(a, b)| format!("{:.2}×", a / b))
                };
                let offload = self.lookup_us(device_us, d, Way::Offload);
                let _ = writeln!(
                    s,
                    "| {d} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    cell(device_us, d, Way::Offload),
                    daemon(device_us, d, Way::Offload),
                    cell(device_us, d, Way::MountDirect),
                    ratio(self.lookup_us(device_us, d, Way::MountDirect), offload),
                    self.floor_us(device_us, d)
                        .map_or("–".into(), |f| format!("{f:.1}")),
                    ratio(offload, self.floor_us(device_us, d)),
                    cell(device_us, d, Way::OffloadBatch),
                    cell(device_us, d, Way::MountCached),
                    cell(device_us, d, Way::HostCached),
                    cell(device_us, d, Way::HostDirect),
                );
            }
            let _ = writeln!(s, "\n{}\n", self.crossover(device_us));
        }
        let _ = writeln!(
            s,
            "Crossings: VERSION ioctl {} µs, null RUN ioctl {} µs (median, one thread, each measured on \
             its own), of which {} µs in the daemon (mean).",
            cell(0, 0, Way::VersionIoctl),
            cell(0, 0, Way::NullRun),
            daemon(0, 0, Way::NullRun)
        );
        if let Some(c) = &self.crossings {
            let _ = writeln!(
                s,
                "Measured in turns (one of each, over and over, so that the host's noise falls on \
                 all alike): VERSION {:.1} ({:.0}) µs, null RUN in the small struct (224 B) {:.1} ({:.0}) µs, \
                 in the large one (9312 B) {:.1} ({:.0}) µs.",
                c.version.median_us,
                c.version.p99_us,
                c.null_small.median_us,
                c.null_small.p99_us,
                c.null_large.median_us,
                c.null_large.p99_us
            );
        }
        s.push('\n');
        let depth = self.plan.max_depth.min(4);
        let _ = writeln!(
            s,
            "Throughput at depth {depth}, lookups per second over all threads:\n\n![lookup throughput]({})\n\n\
             | device | way | {} |\n|---|---|{}",
            img("lookup-throughput.png"),
            self.plan
                .threads
                .iter()
                .map(|t| format!("{t} thread{}", if *t == 1 { "" } else { "s" }))
                .collect::<Vec<_>>()
                .join(" | "),
            "---:|".repeat(self.plan.threads.len())
        );
        for &device_us in &self.plan.device_us {
            for way in [
                Way::Offload,
                Way::OffloadBatch,
                Way::MountDirect,
                Way::RawDevice,
            ] {
                let rates: Vec<String> = self
                    .plan
                    .threads
                    .iter()
                    .map(|&t| {
                        self.lookup(device_us, depth, way, t)
                            .map_or("–".into(), |r| format!("{:.0}", r.stats.ops_per_sec))
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "| +{device_us} µs | {} | {} |",
                    way.label(),
                    rates.join(" | ")
                );
            }
        }
    }

    fn scan_table(&self, s: &mut String, img: &dyn Fn(&str) -> String) {
        let ways = scans::Way::ALL;
        let _ = writeln!(
            s,
            "\n### Scans\n\nGB/s of file scanned (median of {} runs); in brackets, the bytes that crossed into \
             the application.\n\n![scan]({})\n\n| selectivity | {} |\n|---:|{}",
            self.plan.scan_repeats,
            img("scan.png"),
            ways.map(|w| w.label()).join(" | "),
            "---:|".repeat(ways.len())
        );
        for &sel in &self.plan.selectivities {
            let cells: Vec<String> = ways
                .iter()
                .map(|&w| {
                    self.scans
                        .iter()
                        .find(|r| r.selectivity == sel && r.way == w)
                        .map_or("–".into(), |r| {
                            format!("{:.2} ({})", r.gb_per_sec, bytes(r.returned_bytes))
                        })
                })
                .collect();
            let _ = writeln!(s, "| {} % | {} |", sel * 100.0, cells.join(" | "));
        }
    }

    fn rmw_table(&self, s: &mut String, img: &dyn Fn(&str) -> String) {
        let _ = writeln!(
            s,
            "\n### Read-modify-write\n\nIncrements per second over all workers (median µs per increment); \
             every run checks that the counters grew by exactly the increments done.\n\n![rmw]({})\n\n\
             | workers | {} | {} | ratio |\n|---:|---:|---:|---:|",
            img("rmw.png"),
            rmw::Way::Offload.label(),
            rmw::Way::ReadWrite.label()
        );
        for &w in &self.plan.rmw_workers {
            let get = |way| {
                self.rmw
                    .iter()
                    .find(|r| r.way == way && r.workers == w)
                    .map(|r| r.stats)
            };
            if let (Some(o), Some(rw)) = (get(rmw::Way::Offload), get(rmw::Way::ReadWrite)) {
                let _ = writeln!(
                    s,
                    "| {w} | {:.0} ({:.1}) | {:.0} ({:.1}) | {:.2}× |",
                    o.ops_per_sec,
                    o.median_us,
                    rw.ops_per_sec,
                    rw.median_us,
                    o.ops_per_sec / rw.ops_per_sec
                );
            }
        }
    }
}

/// Work on different files at once.
fn apart_tables(s: &mut String, a: &concurrency::Results) {
    let _ = writeln!(
        s,
        "\n### Files apart\n\n4 KiB `O_DIRECT` random reads of one file (one thread) while another \
         thread reads or writes another file in 1 MiB `O_DIRECT` pieces: µs per read, and what the \
         other thread moved.\n\n| meanwhile | median | p99 | reads per s | other file, MB/s |\n\
         |---|---:|---:|---:|---:|"
    );
    for c in &a.contention {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.1} | {:.0} | {:.0} |",
            c.background.label(),
            c.reads.median_us,
            c.reads.p99_us,
            c.reads.ops_per_sec,
            c.background_mb_per_sec
        );
    }
    let _ = writeln!(
        s,
        "\nOffloaded lookups (`btree.c`), each thread on a file of its own:\n\n\
         | threads | depth | lookups per s | median µs |\n|---:|---:|---:|---:|"
    );
    for r in &a.scaling {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.1} |",
            r.threads, r.depth, r.stats.ops_per_sec, r.stats.median_us
        );
    }
}

/// The "Targets" table of a section: each target, what it wants, what was measured.
pub fn targets_table(s: &mut String, targets: &[Target]) {
    s.push_str(
        "### Targets (ratios from this run)\n\n| target | want | measured | |\n|---|---|---|---|\n",
    );
    for t in targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t.what,
            t.want,
            t.measured,
            if t.met { "met" } else { "**missed**" }
        );
    }
}

fn overhead_tables(s: &mut String, o: &Overheads) {
    s.push_str(
        "\n### Runtime overheads\n\nVerification of each example in `bpf-progs/` (target < 50 ms) and \
         compiling it for the checked engine; \"worst case\" is the verifier's proven bound on \
         instructions per invocation, \"held\" what the loaded program occupies (code, \
         instructions, globals).\n\n\
         | program | instructions | worst case | processed | states | verify | compile | held |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for v in &o.verification {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2} ms | {:.2} ms | {} |",
            v.program,
            v.insns,
            v.max_insns,
            v.processed,
            v.states,
            v.ms,
            v.compile_ms,
            bytes(v.bytes)
        );
    }
    s.push_str(
        "\nThe same runs on each engine, in this process (no FUSE): time per run, and GB/s for \
         the scans. The checked engine checks every access and counts every instruction; \
         rbpf's JIT checks nothing (nearfs ran it until this engine replaced it); rbpf's \
         interpreter is the reference.\n\n| workload |",
    );
    for (_, label) in crate::overheads::ENGINES {
        let _ = write!(s, " {label} |");
    }
    s.push_str(" checked / unchecked |\n|---|---:|---:|---:|---:|\n");
    for e in &o.engines {
        let _ = write!(s, "| {} |", e.workload);
        for k in 0..3 {
            match e.gb_per_sec(k) {
                Some(g) => {
                    let _ = write!(s, " {:.2} µs ({g:.2} GB/s) |", e.us[k]);
                }
                None => {
                    let _ = write!(s, " {:.2} µs |", e.us[k]);
                }
            }
        }
        let _ = writeln!(s, " {:.2}× |", e.us[0] / e.us[1]);
    }
    let _ = writeln!(
        s,
        "\nSetting up a run (a program that returns at once, empty range): {:.0} ns on the checked \
         engine, {:.0} ns on the unchecked JIT, {:.0} ns on the interpreter (target < 1 µs).",
        o.setup_ns[0], o.setup_ns[1], o.setup_ns[2]
    );
}

/// The date, as `date +%F` gives it.
pub fn today() -> String {
    std::process::Command::new("date")
        .arg("+%F")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// `out` as a link from the document `doc`: relative when `out` lies beside or below it.
pub fn relative(out: &Path, doc: &Path) -> PathBuf {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (out, dir) = (abs(out), abs(doc.parent().unwrap_or(Path::new("."))));
    out.strip_prefix(&dir)
        .map_or(out.clone(), Path::to_path_buf)
}

/// Replaces the block between the markers `begin` and `end` of `doc` (appends one if
/// there is none).
pub fn splice_between(doc: &Path, begin: &str, end: &str, markdown: &str) -> Result<()> {
    let text = std::fs::read_to_string(doc).unwrap_or_default();
    let block = format!("{begin}\n{markdown}\n{end}");
    let new = match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &text[..b], &text[e + end.len()..]),
        _ => format!("{text}\n{block}\n"),
    };
    std::fs::write(doc, new).with_context(|| format!("cannot write {}", doc.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_marked_block() {
        let dir = tempfile::tempdir().unwrap();
        let doc = dir.path().join("b.md");
        std::fs::write(&doc, format!("# head\n{BEGIN}\nold\n{END}\ntail\n")).unwrap();
        splice_between(&doc, BEGIN, END, "new").unwrap();
        let text = std::fs::read_to_string(&doc).unwrap();
        assert_eq!(text, format!("# head\n{BEGIN}\nnew\n{END}\ntail\n"));
        // Without markers the block is appended, and found again next time.
        let bare = dir.path().join("c.md");
        std::fs::write(&bare, "text\n").unwrap();
        splice_between(&bare, BEGIN, END, "one").unwrap();
        splice_between(&bare, BEGIN, END, "two").unwrap();
        let text = std::fs::read_to_string(&bare).unwrap();
        assert_eq!(text, format!("text\n\n{BEGIN}\ntwo\n{END}\n"));
    }

    #[test]
    fn plots_are_linked_relative_to_the_document() {
        let p = relative(Path::new("docs/bench"), Path::new("docs/benchmarks.md"));
        assert_eq!(p, Path::new("bench"));
        let p = relative(Path::new("/tmp/x"), Path::new("docs/benchmarks.md"));
        assert_eq!(p, Path::new("/tmp/x"));
    }

    #[test]
    fn floats_read_back_exactly_so_replots_match() {
        let mut x = 1.5667038103464825f64;
        for _ in 0..10_000 {
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(back.to_bits(), x.to_bits());
            x = x * 1.000_123_456_7 + 0.337;
        }
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(32), "32 B");
        assert_eq!(bytes(3 << 10), "3.0 KiB");
        assert_eq!(bytes(5 << 20), "5.0 MiB");
    }
}
