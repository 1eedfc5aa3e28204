//! Helpers shared by the in-process tests: a filesystem on an in-memory device.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use blockdev::{BlockDevice, MemDevice};
use extents::{Creds, FileKind, Fs, Ino, MkfsOptions, MountOptions};

pub const MIB: u64 = 1 << 20;

pub fn root() -> Creds {
    Creds::root()
}

/// A freshly formatted in-memory device of `bytes`.
pub fn formatted(bytes: u64) -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::new(bytes));
    Fs::mkfs(dev.clone(), MkfsOptions::default()).expect("mkfs");
    dev
}

pub fn mount(dev: &Arc<MemDevice>) -> Fs {
    Fs::mount(dev.clone() as Arc<dyn BlockDevice>, MountOptions::default()).expect("mount")
}

/// A mounted filesystem on a fresh in-memory device of `bytes`.
pub fn fresh(bytes: u64) -> (Arc<MemDevice>, Fs) {
    let dev = formatted(bytes);
    let fs = mount(&dev);
    (dev, fs)
}

/// Resolves a slash-separated path from the root.
pub fn resolve(fs: &Fs, path: &str) -> extents::Result<Ino> {
    let mut ino = Ino::ROOT;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = fs.lookup(&root(), ino, part.as_bytes())?.ino;
    }
    Ok(ino)
}

/// Creates (or truncates) `name` in `dir` and writes `data` into it.
pub fn put(fs: &Fs, dir: Ino, name: &str, data: &[u8]) -> Ino {
    let ino = match fs.lookup(&root(), dir, name.as_bytes()) {
        Ok(a) => a.ino,
        Err(_) => {
            let a = fs
                .create(&root(), dir, name.as_bytes(), 0o644)
                .expect("create");
            fs.release(a.ino);
            a.ino
        }
    };
    let size = extents::SetAttr {
        size: Some(0),
        ..Default::default()
    };
    fs.setattr(&root(), ino, size).expect("truncate");
    assert_eq!(fs.write(&root(), ino, 0, data).expect("write"), data.len());
    ino
}

/// Reads a whole file.
pub fn get(fs: &Fs, ino: Ino) -> Vec<u8> {
    let size = fs.getattr(ino).expect("getattr").size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let chunk = fs.read(ino, out.len() as u64, 1 << 20).expect("read");
        assert!(!chunk.is_empty(), "short read before EOF");
        out.extend_from_slice(&chunk);
    }
    out
}

/// Every path in the tree with its content (files), target (symlinks) or nothing (dirs).
pub fn tree(fs: &Fs) -> BTreeMap<String, Option<Vec<u8>>> {
    tree_with_inodes(fs)
        .into_iter()
        .map(|(path, (_, content))| (path, content))
        .collect()
}

/// Like [`tree`], with each path's inode number.
pub fn tree_with_inodes(fs: &Fs) -> BTreeMap<String, (Ino, Option<Vec<u8>>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(Ino::ROOT, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in fs.readdir(dir, 0, usize::MAX).expect("readdir") {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&e.name));
            let content = match e.kind {
                FileKind::Directory => {
                    stack.push((e.ino, path.clone()));
                    None
                }
                FileKind::Symlink => Some(fs.readlink(e.ino).expect("readlink")),
                _ => Some(get(fs, e.ino)),
            };
            out.insert(path, (e.ino, content));
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// fsck must find nothing wrong.
pub fn assert_clean(dev: &Arc<MemDevice>) {
    let copy: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(dev.snapshot()));
    let report = extents::fsck::fsck(copy, false).expect("fsck runs");
    assert!(report.errors.is_empty(), "fsck found: {:#?}", report.errors);
}
