//! The appcode runtime's costs: `cargo bench -p appcode --bench runtime`.
//!
//! - verification time of every program in `bpf-progs/` (target < 50 ms each);
//! - JIT against interpreter on a byte scan (`bytecount`, target ≥ 100×) and on a binary
//!   search inside one 4 KiB node (`bsearch`);
//! - the cost of setting up a run: a program that returns at once (target < 1 µs).
//!
//! Each figure is the median of 7 batches; the machine is printed first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use appcode::elf;
use appcode::program;
use appcode::{Extent, Mode, Program, Request, World};
use blockdev::{BlockDevice, MemDevice};

fn progs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bpf-progs")
}

fn compile(c: &Path, out: &Path) -> Vec<u8> {
    let status = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-c", "-I"])
        .arg(progs_dir().join("include"))
        .arg(c)
        .arg("-o")
        .arg(out)
        .status()
        .expect("clang");
    assert!(status.success());
    std::fs::read(out).unwrap()
}

/// Median over 7 batches of the time per call of `f`, with batches of about 100 ms.
fn per_call(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    f();
    let once = start.elapsed().max(Duration::from_nanos(20));
    let n = (Duration::from_millis(100).as_nanos() / once.as_nanos()).clamp(1, 10_000_000) as u32;
    let mut batches: Vec<Duration> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed() / n
        })
        .collect();
    batches.sort();
    batches[3]
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

struct File {
    device: MemDevice,
    extents: Vec<Extent>,
    size: u64,
}

impl File {
    fn new(data: &[u8]) -> File {
        let device = MemDevice::new(data.len() as u64 + 8192);
        device.write_at(data, 4096).unwrap();
        File {
            device,
            extents: vec![Extent {
                file_off: 0,
                dev_off: 4096,
                len: data.len() as u64,
                unwritten: false,
            }],
            size: data.len() as u64,
        }
    }

    fn world(&self) -> World<'_> {
        World {
            device: &self.device,
            extents: &self.extents,
            file_size: self.size,
            range: 0..self.size,
            writable: false,
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    println!("machine: {}", machine());
    let dir = std::env::temp_dir().join(format!("appcode-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    println!("\nverification (median of 7 batches)");
    println!("| program | instructions | worst case per invocation | processed | states | time |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(progs_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    let mut objects = Vec::new();
    for c in &sources {
        let obj = compile(c, &dir.join("p.o"));
        let loaded = elf::load(&obj).unwrap();
        for linked in &loaded.programs {
            let p = program::prepare(linked, &loaded).unwrap();
            let t = per_call(|| {
                program::prepare(linked, &loaded).unwrap();
            });
            println!(
                "| {} | {} | {} | {} | {} | {:.2} ms |",
                linked.name,
                p.insns.len(),
                p.verified.max_insns,
                p.verified.processed,
                p.verified.states,
                t.as_secs_f64() * 1e3
            );
        }
        objects.push((c.file_stem().unwrap().to_string_lossy().into_owned(), obj));
    }
    let object = |name: &str| &objects.iter().find(|(n, _)| n == name).unwrap().1;

    println!("\nJIT against interpreter");
    println!("| workload | JIT | interpreter | ratio |");
    println!("|---|---:|---:|---:|");
    let scan: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let scan_file = File::new(&scan);
    let mut keys: Vec<u64> = (0..512u64).map(|i| i * 7 + 3).collect();
    keys.sort_unstable();
    let node: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    let node_file = File::new(&node);
    let workloads: [(&str, &str, &File, Vec<u8>); 2] = [
        (
            "byte scan, 1 MiB (bytecount)",
            "bytecount",
            &scan_file,
            vec![7],
        ),
        (
            "binary search in a 4 KiB node (bsearch)",
            "bsearch",
            &node_file,
            keys[300].to_le_bytes().to_vec(),
        ),
    ];
    for (what, name, file, arg) in workloads {
        let mut times = Vec::new();
        let mut results = Vec::new();
        for mode in [Mode::Jit, Mode::Interpreter] {
            let p = Program::from_elf(object(name), None, mode).unwrap();
            let req = Request {
                arg: &arg,
                ..Default::default()
            };
            results.push(p.run(file.world(), &req).unwrap().result);
            times.push(per_call(|| {
                p.run(file.world(), &req).unwrap();
            }));
        }
        assert_eq!(results[0], results[1]);
        let rate = |t: Duration| {
            if name == "bytecount" {
                format!("{:.0} MB/s", scan.len() as f64 / t.as_secs_f64() / 1e6)
            } else {
                format!("{:.2} µs", t.as_secs_f64() * 1e6)
            }
        };
        println!(
            "| {what} | {} | {} | {:.0}× |",
            rate(times[0]),
            rate(times[1]),
            times[1].as_secs_f64() / times[0].as_secs_f64()
        );
    }

    println!("\nsetting up a run (a program that returns at once, empty range)");
    let nothing = appcode::asm::assemble("mov %r0, 0\nexit").unwrap();
    let empty = File::new(&[]);
    for mode in [Mode::Jit, Mode::Interpreter] {
        let p = Program::from_insns("nothing", &nothing, mode).unwrap();
        let t = per_call(|| {
            p.run(empty.world(), &Request::default()).unwrap();
        });
        println!("- {mode:?}: {:.0} ns per run", t.as_secs_f64() * 1e9);
    }
    std::fs::remove_dir_all(&dir).ok();
}
