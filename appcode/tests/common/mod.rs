//! Helpers shared by the appcode test binaries.
#![allow(dead_code)]

pub mod shapes;

use std::path::{Path, PathBuf};
use std::process::Command;

use appcode::{Extent, World};
use blockdev::MemDevice;

/// The repository's `bpf-progs/`.
pub fn progs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bpf-progs")
}

/// Compiles C to a BPF object: `clang -O2 -g -target bpf -mcpu=CPU -I bpf-progs/include`.
pub fn compile(src: &str, cpu: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("p.c");
    std::fs::write(&c, src).unwrap();
    compile_file(&c, cpu)
}

pub fn compile_file(c: &Path, cpu: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("p.o");
    let out = Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", &format!("-mcpu={cpu}"), "-c"])
        .arg("-I")
        .arg(progs_dir().join("include"))
        .arg(c)
        .arg("-o")
        .arg(&o)
        .output()
        .expect("clang is needed (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "clang {}: {}",
        c.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(o).unwrap()
}

/// A file whose bytes are `data`, stored contiguously on an in-memory device at
/// `dev_off`, with an extent map saying so.
pub struct TestFile {
    pub device: MemDevice,
    pub extents: Vec<Extent>,
    pub size: u64,
}

impl TestFile {
    pub fn new(data: &[u8]) -> TestFile {
        let dev_off = 1 << 20;
        let device = MemDevice::new(dev_off + data.len().next_multiple_of(4096) as u64 + 4096);
        blockdev::BlockDevice::write_at(&device, data, dev_off).unwrap();
        TestFile {
            device,
            extents: vec![Extent {
                file_off: 0,
                dev_off,
                len: data.len().next_multiple_of(4096) as u64,
                unwritten: false,
            }],
            size: data.len() as u64,
        }
    }

    pub fn world(&self, writable: bool) -> World<'_> {
        World {
            device: &self.device,
            extents: &self.extents,
            file_size: self.size,
            range: 0..self.size,
            writable,
        }
    }
}

/// A small deterministic generator (xorshift64*), so that tests need no extra crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
