//! Plain block service: fio's nbd engine against `nearfs serve`, `qemu-nbd` and `nbdkit
//! file`, each serving the same image file in turn, on loopback. Random 4 KiB reads, and
//! sequential 1 MiB reads and writes, at a fixed queue depth on one connection.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nearfs_client::layouts::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::servers::{Kind, Server, die_with_parent};

/// What each fio run does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub image_bytes: u64,
    /// Measured time of each fio run, after `ramp`.
    pub runtime: Duration,
    pub ramp: Duration,
    /// Requests in flight on the one connection.
    pub iodepth: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Test {
    SeqWrite,
    RandRead,
    SeqRead,
}

impl Test {
    /// In the order they run: the write first, so that the reads find written blocks.
    pub const ALL: [Test; 3] = [Test::SeqWrite, Test::RandRead, Test::SeqRead];

    pub fn label(self) -> &'static str {
        match self {
            Test::RandRead => "4 KiB random read",
            Test::SeqRead => "1 MiB sequential read",
            Test::SeqWrite => "1 MiB sequential write",
        }
    }

    /// fio's `rw` and `bs`.
    fn fio(self) -> (&'static str, &'static str) {
        match self {
            Test::RandRead => ("randread", "4k"),
            Test::SeqRead => ("read", "1m"),
            Test::SeqWrite => ("write", "1m"),
        }
    }

    fn writes(self) -> bool {
        self == Test::SeqWrite
    }

    /// What is reported: IOPS for small random reads, MB/s for large transfers.
    pub fn figure(self, r: &Row) -> f64 {
        match self {
            Test::RandRead => r.iops,
            _ => r.mb_per_sec,
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Test::RandRead => "IOPS",
            _ => "MB/s",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub server: Kind,
    pub test: Test,
    pub iops: f64,
    /// Millions of bytes per second.
    pub mb_per_sec: f64,
    /// Completion latency percentiles, µs.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Whether fio is here and has its nbd engine (built with libnbd).
pub fn fio_has_nbd() -> bool {
    Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("uri"))
}

/// Every test against every server in `servers`, over one image under `dir`. Servers
/// not installed are listed in `skipped`.
pub fn measure(
    plan: &Plan,
    nearfs: &Path,
    dir: &Path,
    servers: &[Kind],
    rows: &mut Vec<Row>,
    skipped: &mut Vec<String>,
) -> Result<()> {
    if !fio_has_nbd() {
        skipped.push("all: fio has no nbd engine here".into());
        return Ok(());
    }
    let image = dir.join("block.img");
    prefill(&image, plan.image_bytes)?;
    for &kind in servers {
        if !kind.installed(nearfs) {
            skipped.push(format!("{}: not installed", kind.label()));
            continue;
        }
        eprintln!("==> fio against {}", kind.label());
        let server = Server::start(kind, nearfs, &image, dir)?;
        for test in Test::ALL {
            let row = fio(plan, &server, test, dir)?;
            eprintln!(
                "    {}: {:.0} {}",
                test.label(),
                test.figure(&row),
                test.unit()
            );
            rows.push(row);
            if test.writes() {
                // Written pages go to the disk now, not during the next server's reads.
                std::fs::File::open(&image)?.sync_all()?;
            }
        }
    }
    std::fs::remove_file(&image).ok();
    Ok(())
}

/// Writes the whole image (no holes: every read finds data), and syncs it.
fn prefill(image: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(image)?);
    let mut rng = Rng::new(99);
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..bytes.div_ceil(chunk.len() as u64) {
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.into_inner()?.sync_all()?;
    Ok(())
}

fn fio(plan: &Plan, server: &Server, test: Test, dir: &Path) -> Result<Row> {
    let (rw, bs) = test.fio();
    let out = dir.join(format!("fio-{rw}.json"));
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={rw}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", server.url()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={}", plan.iodepth))
        .arg("--numjobs=1")
        .arg("--time_based")
        .arg(format!("--runtime={}ms", plan.runtime.as_millis()))
        .arg(format!("--ramp_time={}ms", plan.ramp.as_millis()))
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()));
    die_with_parent(&mut cmd);
    let result = cmd.output().context("running fio")?;
    if !result.status.success() {
        bail!(
            "fio {rw} against {}: {}{}",
            server.kind.label(),
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)
        .with_context(|| format!("fio's output {}", out.display()))?;
    std::fs::remove_file(&out).ok();
    parse(&json, server.kind, test)
}

/// The figures of fio's JSON for the one job.
fn parse(json: &Value, server: Kind, test: Test) -> Result<Row> {
    let job = &json["jobs"][0];
    if job["error"].as_i64() != Some(0) {
        bail!("fio reported error {} for {}", job["error"], test.label());
    }
    let side = &job[if test.writes() { "write" } else { "read" }];
    let number = |v: &Value, what: &str| {
        v.as_f64()
            .with_context(|| format!("no {what} in fio's output for {}", test.label()))
    };
    if number(&side["io_bytes"], "io_bytes")? <= 0.0 {
        bail!("fio moved no data in {}", test.label());
    }
    let pct = &side["clat_ns"]["percentile"];
    Ok(Row {
        server,
        test,
        iops: number(&side["iops"], "iops")?,
        mb_per_sec: number(&side["bw_bytes"], "bw_bytes")? / 1e6,
        p50_us: number(&pct["50.000000"], "p50")? / 1e3,
        p99_us: number(&pct["99.000000"], "p99")? / 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_gives_the_side_that_was_measured() {
        let json: Value = serde_json::from_str(
            r#"{"jobs":[{"error":0,
                "read":{"io_bytes":4096,"iops":1000.5,"bw_bytes":4098048,
                        "clat_ns":{"percentile":{"50.000000":80000,"99.000000":250000}}},
                "write":{"io_bytes":0,"iops":0,"bw_bytes":0}}]}"#,
        )
        .unwrap();
        let r = parse(&json, Kind::Qemu, Test::RandRead).unwrap();
        assert_eq!(r.iops, 1000.5);
        assert!((r.mb_per_sec - 4.098048).abs() < 1e-9);
        assert_eq!((r.p50_us, r.p99_us), (80.0, 250.0));
        // The write side moved nothing: that is an error, not a zero.
        assert!(parse(&json, Kind::Qemu, Test::SeqWrite).is_err());
    }
}
