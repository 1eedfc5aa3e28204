//! `nearfs-bench`: does offload beat every alternative, and by how much.
//!
//! It makes an image, mounts nearfs over it (again for each injected device latency), writes
//! its data to the mount and to the host filesystem, and measures side by side in one run:
//! dependent lookups ([`lookups`]), scans ([`scans`]), read-modify-write ([`rmw`]) and the
//! runtime's own costs ([`overheads`]). Every operation's answer is checked as it runs.
//! It writes `results.json` and PNG plots into `--out`, prints the Markdown tables, and
//! with `--docs FILE` puts them between the `bench` markers of FILE.
//! `scripts/bench.sh` builds it and runs it.

mod lookups;
mod measure;
mod overheads;
mod plot;
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
    let r = match &args.replot {
        Some(json) => {
            let text = std::fs::read_to_string(json)
                .with_context(|| format!("cannot read {}", json.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}", json.display()))?
        }
        None => measure(args)?,
    };
    let json = args.out.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&r)?)?;
    plot::all(&r, &args.out)?;
    let images = match &args.docs {
        Some(doc) => report::relative(&args.out, doc),
        None => args.out.clone(),
    };
    let markdown = r.markdown(&images);
    println!("{markdown}");
    if let Some(doc) = &args.docs {
        report::splice(doc, &markdown)?;
    }
    eprintln!(
        "==> {} and plots in {}, {:.0} s",
        json.display(),
        args.out.display(),
        r.seconds
    );
    Ok(())
}

/// Everything measured, on a fresh image under `args.work`.
fn measure(args: &Args) -> Result<report::Results> {
    let started = Instant::now();
    let plan = Plan::new(args.quick);
    let work = setup::Work::create(&args.work, plan.image_bytes)?;
    let mut r = report::Results::new(&plan);
    {
        let m = work.mount(0)?;
        eprintln!("==> writing the data");
        let mut trees = lookups::prepare(&plan, &work, &m)?;
        eprintln!("==> lookups, device as it is");
        lookups::measure(&plan, &work, &m, 0, &mut trees, &mut r.lookups)?;
        eprintln!("==> scans");
        scans::measure(&plan, &work, &m, &mut r.scans)?;
        eprintln!("==> read-modify-write");
        rmw::measure(&plan, &work, &m, &mut r.rmw)?;
        drop(m);
        for &us in plan.device_us.iter().filter(|&&us| us > 0) {
            eprintln!("==> lookups, device +{us} µs per access");
            let m = work.mount(us)?;
            lookups::measure(&plan, &work, &m, us, &mut trees, &mut r.lookups)?;
        }
    }
    eprintln!("==> runtime overheads");
    r.overheads = Some(overheads::measure(plan.batch, &work.objects)?);
    r.seconds = started.elapsed().as_secs_f64();
    r.finish();
    Ok(r)
}
