//! Helpers shared by the appcode test binaries.
#![allow(dead_code)]

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

/// Node layout of `bpf-progs/btree.c`.
pub const NODE: usize = 4096;
pub const FANOUT: usize = 255;

/// Builds the B+-tree of `btree.c` over sorted `(key, value)` pairs; returns the file
/// and the tree's depth.
pub fn build_btree(pairs: &[(u64, u64)]) -> (Vec<u8>, usize) {
    fn node(leaf: bool, entries: &[(u64, u64)]) -> Vec<u8> {
        let mut n = vec![0u8; NODE];
        n[0..8].copy_from_slice(&u64::from(leaf).to_le_bytes());
        n[8..16].copy_from_slice(&(entries.len() as u64).to_le_bytes());
        for (i, (k, v)) in entries.iter().enumerate() {
            n[16 + 8 * i..24 + 8 * i].copy_from_slice(&k.to_le_bytes());
            let at = 16 + 8 * FANOUT + 8 * i;
            n[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        n
    }
    // Nodes are laid out leaves first; the root is moved to offset 0 at the end.
    let mut nodes: Vec<Vec<u8>> = Vec::new();
    let mut level: Vec<(u64, usize)> = Vec::new(); // (first key, node index)
    for chunk in pairs.chunks(FANOUT) {
        nodes.push(node(true, chunk));
        level.push((chunk[0].0, nodes.len() - 1));
    }
    let mut depth = 1;
    while level.len() > 1 {
        let mut up = Vec::new();
        for chunk in level.chunks(FANOUT) {
            // Child offsets are filled in once the final order is known.
            let entries: Vec<(u64, u64)> = chunk.iter().map(|&(k, i)| (k, i as u64)).collect();
            nodes.push(node(false, &entries));
            up.push((chunk[0].0, nodes.len() - 1));
        }
        level = up;
        depth += 1;
    }
    let root = level[0].1;
    // Final order: root first, then the rest in index order.
    let mut order: Vec<usize> = vec![root];
    order.extend((0..nodes.len()).filter(|&i| i != root));
    let mut place = vec![0u64; nodes.len()];
    for (pos, &i) in order.iter().enumerate() {
        place[i] = (pos * NODE) as u64;
    }
    let mut file = Vec::with_capacity(nodes.len() * NODE);
    for &i in &order {
        let mut n = nodes[i].clone();
        if n[0] == 0 {
            let count = u64::from_le_bytes(n[8..16].try_into().unwrap()) as usize;
            for e in 0..count {
                let at = 16 + 8 * FANOUT + 8 * e;
                let child = u64::from_le_bytes(n[at..at + 8].try_into().unwrap()) as usize;
                n[at..at + 8].copy_from_slice(&place[child].to_le_bytes());
            }
        }
        file.extend_from_slice(&n);
    }
    (file, depth)
}
