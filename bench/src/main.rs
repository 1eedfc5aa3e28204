//! `nearfs-bench`: does offload beat every alternative, and by how much.
//!
//! It makes an image, mounts nearfs over it (again for each injected device latency), writes
//! its data to the mount and to the host filesystem, and measures side by side in one run:
//! dependent lookups ([`lookups`]), scans ([`scans`]), read-modify-write ([`rmw`]), work on
//! different files at once ([`concurrency`]) and the runtime's own costs ([`overheads`]); then the same kinds of operation over NBD, by the
//! application, in the daemon and at the storage target, and plain block service against
//! other NBD servers ([`remote`]). Every operation's answer is checked as it runs.
//! It writes `results.json` and PNG plots into `--out`, prints the Markdown tables, and
//! with `--docs FILE` puts them between the `bench` (and `bench-remote`) markers of FILE.
//! `scripts/bench.sh` builds it and runs it.

mod concurrency;
mod lookups;
mod measure;
mod overheads;
mod plot;
mod remote;
mod report;
mod rmw;
mod scans;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(
    name = "nearfs-bench",
    about = "Offload against every alternative: JSON, plots, tables"
)]
struct Args {
    /// Short runs over small data (about a minute): checks that every benchmark works.
    #[arg(long)]
    quick: bool,
    /// Directory for results.json and the plots.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Markdown file whose `<!-- bench:begin -->` … `<!-- bench:end -->` block to rewrite.
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Where the image, the mount point and the host-filesystem copies go. A disk
    /// filesystem, not tmpfs: the host copies are also read with O_DIRECT.
    #[arg(long, default_value = "/var/tmp")]
    work: PathBuf,
    /// Measure nothing: draw the plots and tables again from this results.json.
    #[arg(long, value_name = "RESULTS_JSON")]
    replot: Option<PathBuf>,
    /// Measure one section only; the other's results, if `--out` holds them, are kept.
    #[arg(long, value_enum)]
    only: Option<Section>,
}

/// The parts of the benchmark, each with its own block in the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// Offload against every alternative on a local mount.
    Local,
    /// Offload over NBD, and plain block service against other NBD servers.
    Remote,
}

/// How much of everything to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub mode: String,
    /// How long each lookup and read-modify-write measurement runs.
    pub cell: Duration,
    pub max_depth: usize,
    /// Keys per B+-tree node (nodes are 4 KiB whatever their fill).
    pub fill: usize,
    /// Latencies added to every device access, µs (0: the image as it is).
    pub device_us: Vec<u64>,
    pub threads: Vec<usize>,
    pub scan_bytes: u64,
    pub scan_repeats: usize,
    pub selectivities: Vec<f64>,
    pub rmw_workers: Vec<usize>,
    /// Batch length of the runtime measurements.
    pub batch: Duration,
    pub image_bytes: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        Plan {
            mode: if quick { "quick" } else { "full" }.into(),
            cell: Duration::from_millis(if quick { 50 } else { 1000 }),
            max_depth: 6,
            fill: if quick { 4 } else { 8 },
            device_us: vec![0, 3, 80],
            threads: vec![1, 2, 4],
            scan_bytes: if quick { 4 << 20 } else { 32 << 20 },
            scan_repeats: if quick { 3 } else { 9 },
            selectivities: vec![0.0001, 0.001, 0.01, 0.1, 1.0],
            rmw_workers: vec![1, 2, 3, 4],
            batch: Duration::from_millis(if quick { 10 } else { 100 }),
            image_bytes: 2 << 30,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nearfs-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let json = args.out.join("results.json");
    let r = match &args.replot {
        Some(saved) => read_results(saved)?,
        None => {
            // Measuring one section keeps the other's results from an earlier run.
            let earlier = match args.only {
                Some(_) if json.exists() => Some(read_results(&json)?),
                _ => None,
            };
            measure(args, earlier)?
        }
    };
    std::fs::write(&json, serde_json::to_string_pretty(&r)?)?;
    let images = match &args.docs {
        Some(doc) => report::relative(&args.out, doc),
        None => args.out.clone(),
    };
    let mut blocks = Vec::new();
    if r.has_local() {
        plot::all(&r, &args.out)?;
        blocks.push((report::BEGIN, report::END, r.markdown(&images)));
    }
    if let Some(remote) = &r.remote {
        plot::remote(remote, &args.out)?;
        blocks.push((remote::BEGIN, remote::END, remote.markdown(&images)));
    }
    for (begin, end, markdown) in &blocks {
        println!("{markdown}");
        if let Some(doc) = &args.docs {
            report::splice_between(doc, begin, end, markdown)?;
        }
    }
    let took: Vec<String> = [
        r.has_local()
            .then(|| format!("local section {:.0} s", r.seconds)),
        r.remote
            .as_ref()
            .map(|m| format!("remote section {:.0} s", m.seconds)),
    ]
    .into_iter()
    .flatten()
    .collect();
    eprintln!(
        "==> {} and plots in {} ({})",
        json.display(),
        args.out.display(),
        took.join(", ")
    );
    Ok(())
}

fn read_results(path: &std::path::Path) -> Result<report::Results> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
}

/// Everything measured (or the sections `--only` names), on fresh images under
/// `args.work`; `earlier` supplies the sections not measured.
fn measure(args: &Args, earlier: Option<report::Results>) -> Result<report::Results> {
    let plan = Plan::new(args.quick);
    let local = args.only != Some(Section::Remote);
    let mut r = match earlier {
        Some(r) if !local => r,
        Some(mut r) => {
            let remote = r.remote.take();
            r = report::Results::new(&plan);
            r.remote = remote;
            r
        }
        None => report::Results::new(&plan),
    };
    if local {
        measure_local(args, &plan, &mut r)?;
    }
    if args.only != Some(Section::Local) {
        let started = Instant::now();
        let mut plan = remote::Plan::new(args.quick);
        let measured = remote::measure(&mut plan, &args.work)?;
        eprintln!(
            "==> remote section: {:.0} s",
            started.elapsed().as_secs_f64()
        );
        r.remote = Some(measured);
    }
    Ok(r)
}

/// The local section, on a fresh image under `args.work`.
fn measure_local(args: &Args, plan: &Plan, r: &mut report::Results) -> Result<()> {
    let started = Instant::now();
    let work = setup::Work::create(&args.work, plan.image_bytes)?;
    {
        let m = work.mount(0)?;
        eprintln!("==> writing the data");
        let mut trees = lookups::prepare(plan, &work, &m)?;
        eprintln!("==> lookups, device as it is");
        lookups::measure(plan, &work, &m, 0, &mut trees, &mut r.lookups)?;
        r.crossings = Some(lookups::crossings(plan, &work, &m, &trees[0])?);
        eprintln!("==> scans");
        scans::measure(plan, &work, &m, &mut r.scans)?;
        eprintln!("==> read-modify-write");
        rmw::measure(plan, &work, &m, &mut r.rmw)?;
        eprintln!("==> files apart");
        let depth4 = &trees[plan.max_depth.min(4) - 1];
        r.apart = Some(concurrency::measure(plan, &work, &m, depth4)?);
        drop(m);
        for &us in plan.device_us.iter().filter(|&&us| us > 0) {
            eprintln!("==> lookups, device +{us} µs per access");
            let m = work.mount(us)?;
            lookups::measure(plan, &work, &m, us, &mut trees, &mut r.lookups)?;
        }
    }
    eprintln!("==> runtime overheads");
    r.overheads = Some(overheads::measure(plan.batch, &work.objects)?);
    r.seconds = started.elapsed().as_secs_f64();
    r.finish();
    Ok(())
}
