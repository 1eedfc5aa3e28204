//! `nearfs demo DIR`: offload end to end on a mounted nearfs, next to the same work done
//! with ordinary reads. It writes a B+-tree and a file of records into DIR, compiles the
//! example programs (embedded here, built with clang at run time), runs lookups and a
//! filter both ways, and prints what each cost and what offload saved.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nearfs_client::Run;
use nearfs_client::layouts::{self, Rng, btree, records};

const HEADER: &str = include_str!("../../bpf-progs/include/nearfs.h");
const BTREE_H: &str = include_str!("../../bpf-progs/include/btree.h");
const BTREE: &str = include_str!("../../bpf-progs/btree.c");
const FILTER: &str = include_str!("../../bpf-progs/filter.c");

const KEYS: u64 = 1_000_000;
const RECORDS: u64 = 1_000_000;
const LOOKUPS: usize = 2000;

fn compile(dir: &Path, name: &str, source: &str) -> anyhow::Result<Vec<u8>> {
    let (c, o) = (dir.join(format!("{name}.c")), dir.join(format!("{name}.o")));
    std::fs::write(&c, source)?;
    let out = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-I"])
        .arg(dir)
        .arg("-c")
        .arg(&c)
        .arg("-o")
        .arg(&o)
        .output()
        .context("the demo compiles appcode with clang (scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!("clang {name}.c: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(std::fs::read(o)?)
}

/// Drops a file's pages from the kernel's cache, so that the next reads reach the daemon.
fn drop_cache(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise takes a descriptor and numbers; it touches no memory of ours.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

pub fn run(dir: &Path) -> anyhow::Result<()> {
    let probe = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nearfs_client::version(&probe)
        .with_context(|| format!("{} is not on a nearfs mount", dir.display()))?;
    let tmp = std::env::temp_dir().join(format!("nearfs-demo-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(tmp.join("nearfs.h"), HEADER)?;
    std::fs::write(tmp.join("btree.h"), BTREE_H)?;
    let result = demo(dir, &tmp);
    std::fs::remove_dir_all(&tmp).ok();
    result
}

fn demo(dir: &Path, tmp: &Path) -> anyhow::Result<()> {
    let mut rng = Rng::new(1);
    let pairs: Vec<(u64, u64)> = (0..KEYS).map(|i| (i * 16 + 5, i * 3)).collect();
    let (tree, depth) = btree::build(&pairs, btree::FANOUT);
    let tree_path = dir.join("demo-tree.db");
    std::fs::write(&tree_path, &tree)?;
    let recs: Vec<(u64, u64)> = (0..RECORDS).map(|i| (i, rng.below(1_000_000))).collect();
    let rec_bytes = records::encode(&recs);
    let rec_path = dir.join("demo-records.bin");
    std::fs::write(&rec_path, &rec_bytes)?;
    println!(
        "wrote {}: {KEYS} keys in a B+-tree of depth {depth} ({})",
        tree_path.display(),
        mib(tree.len() as u64)
    );
    println!(
        "wrote {}: {RECORDS} records of 16 bytes ({})",
        rec_path.display(),
        mib(rec_bytes.len() as u64)
    );

    let tree_file = File::open(&tree_path)?;
    let lookup = nearfs_client::load(&tree_file, &compile(tmp, "btree", BTREE)?, None)?;
    let filter = nearfs_client::load(&tree_file, &compile(tmp, "filter", FILTER)?, None)?;
    let loaded = nearfs_client::list(&tree_file)?;
    for p in loaded.iter().filter(|p| p.id == lookup || p.id == filter) {
        println!(
            "loaded {} (id {}): {} instructions, verified to run at most {} per invocation",
            p.name, p.id.0, p.insns, p.max_insns
        );
    }

    // Lookups: one ioctl each, against one pread per tree level.
    let keys: Vec<(u64, u64)> = (0..LOOKUPS)
        .map(|_| pairs[rng.below(KEYS) as usize])
        .collect();
    let (mut by_offload, mut cached, mut cold) = (Vec::new(), Vec::new(), Vec::new());
    for &(k, v) in &keys {
        let t = Instant::now();
        let out = nearfs_client::run(&tree_file, &Run::new(lookup).arg(&k.to_le_bytes()))?;
        by_offload.push(t.elapsed());
        let read = |b: &mut [u8], at: u64| tree_file.read_exact_at(b, at);
        drop_cache(&tree_file);
        let t = Instant::now();
        let found = btree::lookup(read, k)?;
        cold.push(t.elapsed());
        // The same nodes again, now in the page cache.
        let t = Instant::now();
        let warm = btree::lookup(read, k)?;
        cached.push(t.elapsed());
        if out.result != v || found != Some(v) || warm != found {
            bail!(
                "lookup of {k}: offload {}, reads {found:?}, want {v}",
                out.result
            );
        }
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (o, w, c) = (median(by_offload), median(cached), median(cold));
    println!(
        "\n{LOOKUPS} lookups, same answers every way (medians):\n  offload:              1 ioctl, {depth} nodes read inside the daemon, {:6.1} µs, 8 bytes to the application\n  preads, not cached:   {depth} FUSE round trips, {:6.1} µs, {} bytes to the application\n  preads, page cache:   no round trip at all,  {:6.1} µs\n  offload saves {:.1}× against uncached reads; data the kernel already caches is faster read directly",
        us(o),
        us(c),
        depth * btree::NODE,
        us(w),
        c.as_secs_f64() / o.as_secs_f64()
    );

    // A filter: scanned inside the daemon, against reading the file and filtering here.
    let (lo, hi) = (100_000, 110_000);
    let rec_file = File::open(&rec_path)?;
    let t = Instant::now();
    let out = nearfs_client::run(&rec_file, &Run::new(filter).arg(&records::arg(lo, hi)))?;
    let offload_time = t.elapsed();
    drop_cache(&rec_file);
    let t = Instant::now();
    let read_back = std::fs::read(&rec_path)?;
    let want = records::aggregate(&read_back, lo, hi);
    let read_time = t.elapsed();
    let got = layouts::words(&out.output);
    if got != want {
        bail!("filter: offload {got:?}, reads {want:?}");
    }
    println!(
        "\nfilter values in [{lo}, {hi}] (count {}, sum {}, min {}, max {}), same answer both ways:\n  offload: {} scanned inside the daemon in {:.1} ms, {} bytes to the application\n  reads:   {} crossed into the application (not cached) in {:.1} ms",
        want[0],
        want[1],
        want[2],
        want[3],
        mib(out.costs.device_bytes),
        offload_time.as_secs_f64() * 1e3,
        out.output.len(),
        mib(read_back.len() as u64),
        read_time.as_secs_f64() * 1e3
    );
    for p in [lookup, filter] {
        nearfs_client::unload(&tree_file, p)?;
    }
    println!(
        "\n(see `getfattr -n user.nearfs.stats {}`)",
        tree_path.display()
    );
    Ok(())
}
