//! Many threads at once: mixed operations on private and shared files against a model,
//! writing runs racing writes, and deleted files racing reads of their blocks. Each file
//! holds its own lock across device I/O (`state.rs`); these tests check that what one
//! thread does never shows through another's files, and that a commit taken at any moment
//! is consistent (fsck) and keeps what the model says.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use blockdev::{BlockDevice, LatencyDevice, MemDevice};
use common::*;
use extents::{
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, Fs, FsError, Ino, MountOptions, RenameFlags, SetAttr,
};

const WORKERS: u64 = 4;
const OPS: u64 = 400;
const PRIVATE_FILES: u64 = 3;
/// Each worker owns this many bytes of the shared file.
const SLICE: u64 = 64 << 10;
const COUNTERS: &str = "counters";
const SHARED: &str = "shared";

/// A small deterministic generator per worker.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A filesystem whose every I/O takes a few µs, so that threads overlap inside them.
fn slow_fs(bytes: u64) -> (Arc<MemDevice>, Arc<Fs>) {
    let mem = formatted(bytes);
    let dev: Arc<dyn BlockDevice> =
        Arc::new(LatencyDevice::new(mem.clone(), Duration::from_micros(3)));
    let fs = Fs::mount(dev, MountOptions::default()).expect("mount");
    (mem, Arc::new(fs))
}

/// Adds one to the u64 at `off` of a file, in place, as a writing run does.
fn increment_in_place(fs: &Fs, ino: Ino, off: u64) {
    fs.in_place(ino, true, |f| {
        let e = f
            .extents
            .iter()
            .find(|e| e.file.0 * 4096 <= off && off < (e.file.0 + e.len) * 4096)
            .expect("counter is mapped");
        let at = e.dev.0 * 4096 + off - e.file.0 * 4096;
        let mut v = [0u8; 8];
        f.device.read_at(&mut v, at).unwrap();
        let next = u64::from_le_bytes(v) + 1;
        f.device.write_at(&next.to_le_bytes(), at).unwrap();
        ((), true)
    })
    .unwrap();
}

fn apply_write(model: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    if model.len() < end {
        model.resize(end, 0);
    }
    model[off as usize..end].copy_from_slice(data);
}

/// One worker's share: its private files (by name), its slice of the shared file, and how
/// many increments it made.
fn worker(fs: &Fs, t: u64, start: &Barrier) -> (BTreeMap<String, Vec<u8>>, Vec<u8>, u64) {
    let cr = root();
    let mut rng = Rng(0x5eed + t * 7919);
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let shared = resolve(fs, SHARED).unwrap();
    let counters = resolve(fs, COUNTERS).unwrap();
    let mut slice = pattern(1000 + t, SLICE as usize);
    let mut increments = 0;
    let ino_of = |name: &str| resolve(fs, name).unwrap();
    start.wait();
    for op in 0..OPS {
        let name = format!("p{t}_{}", rng.below(PRIVATE_FILES));
        if !files.contains_key(&name) {
            let a = fs.create(&cr, Ino::ROOT, name.as_bytes(), 0o644).unwrap();
            fs.release(a.ino);
            files.insert(name.clone(), Vec::new());
        }
        let model = files.get_mut(&name).unwrap();
        match rng.below(10) {
            0..=2 => {
                let (off, len) = (rng.below(256 << 10), 1 + rng.below(64 << 10));
                let data = pattern(t << 32 | op, len as usize);
                fs.write(&cr, ino_of(&name), off, &data).unwrap();
                apply_write(model, off, &data);
            }
            3 => {
                let (off, len) = (rng.below(300 << 10), 1 + rng.below(128 << 10));
                let got = fs.read(ino_of(&name), off, len as u32).unwrap();
                let lo = (off as usize).min(model.len());
                let hi = (off + len).min(model.len() as u64) as usize;
                assert_eq!(got, model[lo..hi], "worker {t} op {op}: read of {name}");
            }
            4 => {
                let size = rng.below(300 << 10);
                let req = SetAttr {
                    size: Some(size),
                    ..Default::default()
                };
                fs.setattr(&cr, ino_of(&name), req).unwrap();
                model.resize(size as usize, 0);
            }
            5 => {
                let (off, len) = (rng.below(256 << 10), 1 + rng.below(64 << 10));
                let mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
                fs.fallocate(ino_of(&name), off, len, mode).unwrap();
                let end = ((off + len) as usize).min(model.len());
                if (off as usize) < end {
                    model[off as usize..end].fill(0);
                }
            }
            6 => {
                let to = format!("p{t}_{}", rng.below(PRIVATE_FILES));
                fs.rename(
                    &cr,
                    Ino::ROOT,
                    name.as_bytes(),
                    Ino::ROOT,
                    to.as_bytes(),
                    RenameFlags::default(),
                )
                .unwrap();
                let moved = files.remove(&name).unwrap();
                files.insert(to, moved);
            }
            7 => {
                fs.unlink(&cr, Ino::ROOT, name.as_bytes()).unwrap();
                files.remove(&name);
            }
            8 => {
                let (off, len) = (rng.below(SLICE - 1), 1 + rng.below(16 << 10));
                let len = len.min(SLICE - off);
                let data = pattern(t << 40 | op, len as usize);
                fs.write(&cr, shared, t * SLICE + off, &data).unwrap();
                slice[off as usize..(off + len) as usize].copy_from_slice(&data);
                let back = fs.read(shared, t * SLICE, SLICE as u32).unwrap();
                assert_eq!(
                    back, slice,
                    "worker {t} op {op}: its slice of the shared file"
                );
            }
            _ => {
                increment_in_place(fs, counters, t * 8);
                increments += 1;
                if op % 3 == 0 {
                    fs.fsync(counters).unwrap();
                }
            }
        }
    }
    (files, slice, increments)
}

#[test]
fn many_threads_on_shared_and_private_files_agree_with_a_model_and_commit_consistently() {
    let (mem, fs) = slow_fs(256 * MIB);
    let mut initial = Vec::new();
    for t in 0..WORKERS {
        initial.extend(pattern(1000 + t, SLICE as usize));
    }
    put(&fs, Ino::ROOT, SHARED, &initial);
    put(&fs, Ino::ROOT, COUNTERS, &[0u8; 4096]);
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    // Commits at every moment, each of which must be a consistent cut.
    let committer = {
        let (fs, stop, commits) = (fs.clone(), stop.clone(), commits.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                fs.commit().unwrap();
                commits.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let start = Arc::new(Barrier::new(WORKERS as usize));
    let workers: Vec<_> = (0..WORKERS)
        .map(|t| {
            let (fs, start) = (fs.clone(), start.clone());
            std::thread::spawn(move || worker(&fs, t, &start))
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    committer.join().unwrap();
    assert!(commits.load(Ordering::Relaxed) > 0);

    let check = |fs: &Fs| {
        let shared = resolve(fs, SHARED).unwrap();
        let counters = get(fs, resolve(fs, COUNTERS).unwrap());
        for (t, (files, slice, increments)) in results.iter().enumerate() {
            for k in 0..PRIVATE_FILES {
                let name = format!("p{t}_{k}");
                match (files.get(&name), resolve(fs, &name)) {
                    (Some(model), Ok(ino)) => assert!(get(fs, ino) == *model, "{name} differs"),
                    (None, Err(FsError::NotFound)) => {}
                    (want, got) => panic!("{name}: model {:?}, fs {got:?}", want.is_some()),
                }
            }
            let at = t as u64 * SLICE;
            assert!(fs.read(shared, at, SLICE as u32).unwrap() == *slice);
            let n = u64::from_le_bytes(counters[t * 8..t * 8 + 8].try_into().unwrap());
            assert_eq!(n, *increments, "worker {t}'s increments");
        }
    };
    check(&fs);
    fs.commit().unwrap();
    assert_clean(&mem);
    drop(fs);
    let again = mount(&mem);
    check(&again);
    // Nothing leaked: every block is in a file or free.
    let info = again.info();
    let used: u64 = tree_with_inodes(&again)
        .values()
        .map(|(ino, _)| again.getattr(*ino).unwrap().blocks / 8)
        .sum();
    assert_eq!(info.free_blocks + used, info.data_blocks);
}

/// A deleted file's blocks are given to another file only after every read that may still
/// be reading them has ended: a read sees the deleted file's bytes or fails, never another
/// file's.
#[test]
fn reads_racing_deletion_never_see_the_next_owner_of_the_blocks() {
    let (mem, fs) = slow_fs(64 * MIB);
    let cr = root();
    let len = 256 << 10;
    let current = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (fs, current, stop) = (fs.clone(), current.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut whole, mut gone) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let packed = current.load(Ordering::Acquire);
                    if packed == 0 {
                        continue;
                    }
                    let (ino, fill) = (Ino(packed >> 8), (packed & 0xff) as u8);
                    match fs.read(ino, 0, len as u32) {
                        Ok(data) => {
                            assert!(
                                data.iter().all(|&b| b == fill),
                                "a read of a deleted file saw another file's bytes"
                            );
                            whole += 1;
                        }
                        Err(FsError::NotFound) => gone += 1,
                        Err(e) => panic!("read: {e}"),
                    }
                }
                (whole, gone)
            })
        })
        .collect();
    for round in 0..60u64 {
        let fill = (round % 200 + 1) as u8;
        let victim = put(&fs, Ino::ROOT, "victim", &vec![fill; len]);
        current.store(victim.0 << 8 | u64::from(fill), Ordering::Release);
        std::thread::sleep(Duration::from_micros(300));
        // Deleted with no handle open: freed at once, reusable after the next commit.
        fs.unlink(&cr, Ino::ROOT, b"victim").unwrap();
        fs.commit().unwrap();
        put(&fs, Ino::ROOT, "next", &vec![0xEE; len]);
        fs.commit().unwrap();
        fs.unlink(&cr, Ino::ROOT, b"next").unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut whole = 0;
    for r in readers {
        whole += r.join().unwrap().0;
    }
    assert!(whole > 0, "the readers never read a file");
    fs.commit().unwrap();
    assert_clean(&mem);
}

/// Writing runs on one file hold only that file: a run that does not end keeps its own
/// file's writers waiting, and lets another file be read and written meanwhile.
#[test]
fn a_writing_run_holds_only_its_own_file() {
    let (_mem, fs) = slow_fs(64 * MIB);
    let cr = root();
    let held = put(&fs, Ino::ROOT, "held", &[1u8; 8192]);
    let other = put(&fs, Ino::ROOT, "other", &[2u8; 8192]);
    let (entered, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
    let run = {
        let (fs, entered, release) = (fs.clone(), entered.clone(), release.clone());
        std::thread::spawn(move || {
            fs.in_place(held, true, |_| {
                entered.wait();
                release.wait();
                ((), false)
            })
            .unwrap()
        })
    };
    entered.wait();
    // The run is inside: another file is served as usual...
    fs.write(&cr, other, 0, &[3u8; 4096]).unwrap();
    assert_eq!(fs.read(other, 0, 4096).unwrap(), vec![3u8; 4096]);
    fs.commit().unwrap();
    // ...while a write of the held file waits for the run.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (fs, done) = (fs.clone(), done.clone());
        std::thread::spawn(move || {
            fs.write(&root(), held, 0, &[9u8; 16]).unwrap();
            done.store(true, Ordering::Release);
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let waited = !done.load(Ordering::Acquire);
    release.wait();
    run.join().unwrap();
    writer.join().unwrap();
    assert!(
        waited,
        "a write of the file went ahead while a writing run held it"
    );
    assert_eq!(fs.read(held, 0, 16).unwrap(), vec![9u8; 16]);
}
