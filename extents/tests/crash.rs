//! Power cuts at every device write of a mixed workload, and device failures mid-way.
//!
//! A workload (create, append, overwrite, truncate, rename, link, unlink, fsync, ...) runs
//! on a device that logs every write. Afterwards, for every write index k, the image as
//! it would be after power was lost just before write k is rebuilt — once with every
//! earlier write on the media, once with only what the last flush made durable — and
//! must mount, pass fsck, hold everything fsynced, and never show bytes of a deleted file.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use blockdev::{BlockDevice, CrashDevice, FaultMode, FaultyDevice, MemDevice, WriteLog};
use common::*;
use extents::{Fs, Ino, MountOptions, RenameFlags, SetAttr};

type Tree = BTreeMap<String, (Ino, Option<Vec<u8>>)>;

/// Bytes of files that get deleted; no surviving file ever contains this value.
const DELETED: u8 = 0xDE;

/// File contents for live files: pattern bytes below 0x80, so never `DELETED`.
fn live(seed: u64, len: usize) -> Vec<u8> {
    pattern(seed, len).into_iter().map(|b| b & 0x7f).collect()
}

/// Runs the workload; returns the write count and tree at every completed fsync.
fn workload(fs: &Fs, dev: &CrashDevice) -> Vec<(usize, Tree)> {
    let cr = root();
    let mut checkpoints = vec![(0, tree_with_inodes(fs))];
    let mut sync = |fs: &Fs| {
        fs.fsync(Ino::ROOT).unwrap();
        checkpoints.push((dev.writes(), tree_with_inodes(fs)));
    };
    let a = put(fs, Ino::ROOT, "a", &live(1, 20_000));
    sync(fs);
    let d = fs.mkdir(&cr, Ino::ROOT, b"d", 0o755).unwrap().ino;
    put(fs, d, "b", &live(2, 100_000));
    fs.write(&cr, a, 20_000, &live(3, 50_000)).unwrap();
    sync(fs);
    fs.write(&cr, a, 1_000, &live(4, 4_000)).unwrap(); // in-place overwrite
    fs.rename(&cr, Ino::ROOT, b"a", d, b"a2", RenameFlags::default())
        .unwrap();
    sync(fs);
    let b = resolve(fs, "d/b").unwrap();
    fs.setattr(
        &cr,
        b,
        SetAttr {
            size: Some(10_000),
            ..Default::default()
        },
    )
    .unwrap();
    put(fs, Ino::ROOT, "c", &[DELETED; 40_000]);
    sync(fs);
    fs.unlink(&cr, Ino::ROOT, b"c").unwrap();
    put(fs, Ino::ROOT, "e", &live(5, 60_000));
    sync(fs);
    fs.link(&cr, a, Ino::ROOT, b"f").unwrap();
    fs.unlink(&cr, d, b"a2").unwrap();
    fs.symlink(&cr, d, b"s", b"../f").unwrap();
    fs.mkdir(&cr, d, b"gone", 0o755).unwrap();
    fs.rmdir(&cr, d, b"gone").unwrap();
    sync(fs);
    let e = resolve(fs, "e").unwrap();
    fs.write(&cr, e, 60_000, &live(6, 30_000)).unwrap();
    fs.rename(
        &cr,
        Ino::ROOT,
        b"e",
        Ino::ROOT,
        b"f",
        RenameFlags::default(),
    )
    .unwrap();
    put(fs, d, "h", &[DELETED; 9_000]);
    sync(fs);
    fs.unlink(&cr, d, b"h").unwrap();
    put(fs, Ino::ROOT, "g", &live(7, 5_000)); // never synced
    checkpoints
}

/// Shape of a tree: every path with its kind and length.
fn shape(t: &Tree) -> BTreeMap<&String, Option<usize>> {
    t.iter()
        .map(|(k, (_, v))| (k, v.as_ref().map(Vec::len)))
        .collect()
}

/// Content of inode `ino` in `t`, under whatever name it has there.
fn content_of(t: &Tree, ino: Ino) -> Option<&Vec<u8>> {
    t.values()
        .find(|(i, _)| *i == ino)
        .and_then(|(_, c)| c.as_ref())
}

/// The recovered tree must be checkpoint `j` or `j + 1`, except that bytes overwritten
/// in place after `j` may already show their newer value.
fn check_recovered(got: &Tree, older: &Tree, newer: Option<&Tree>, k: usize) {
    let base = if shape(got) == shape(older) {
        older
    } else if let Some(n) = newer.filter(|n| shape(got) == shape(n)) {
        n
    } else {
        panic!(
            "crash before write {k}: tree {:#?} is neither checkpoint",
            shape(got)
        );
    };
    let other = if std::ptr::eq(base, older) {
        newer
    } else {
        Some(older)
    };
    for (path, (ino, content)) in got {
        let (Some(content), Some((_, Some(want)))) = (content, base.get(path)) else {
            continue;
        };
        let alt = other.and_then(|o| content_of(o, *ino));
        for (i, (&g, &w)) in content.iter().zip(want).enumerate() {
            let ok = g == w || alt.and_then(|a| a.get(i)) == Some(&g);
            // A byte of a deleted file (DELETED) in a live file would fail here: no live
            // file holds that value in any checkpoint.
            assert!(
                ok,
                "crash before write {k}: {path} byte {i} is {g:#x}, expected {w:#x}"
            );
        }
    }
}

fn recover(image: Vec<u8>, k: usize) -> (Arc<MemDevice>, Tree) {
    let dev = Arc::new(MemDevice::from_bytes(image));
    let fs = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, MountOptions::default())
        .unwrap_or_else(|e| panic!("crash before write {k}: mount failed: {e}"));
    let t = tree_with_inodes(&fs);
    drop(fs);
    assert_clean(&dev);
    (dev, t)
}

#[test]
fn every_power_cut_leaves_a_consistent_filesystem_with_all_fsynced_data() {
    let base = formatted(16 * MIB).snapshot();
    let dev = Arc::new(CrashDevice::new(base));
    let fs = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, MountOptions::default()).unwrap();
    let checkpoints = workload(&fs, &dev);
    drop(fs);
    let log: WriteLog = dev.log();
    let n = log.writes();
    assert!(n > 50, "the workload should exercise many writes, got {n}");
    for k in 0..=n {
        let j = checkpoints
            .iter()
            .rposition(|(w, _)| *w <= k)
            .expect("checkpoint 0 has 0 writes");
        let newer = checkpoints.get(j + 1).map(|(_, t)| t);
        for image in [log.image_after_writes(k), log.durable_image_before(k)] {
            let (_, got) = recover(image, k);
            check_recovered(&got, &checkpoints[j].1, newer, k);
        }
    }
}

#[test]
fn device_failures_mid_operation_return_errors_and_keep_the_last_commit() {
    let base = formatted(16 * MIB).snapshot();
    // Count the I/Os of one run, then fail at points spread across it.
    let probe = Arc::new(FaultyDevice::new(
        Arc::new(MemDevice::from_bytes(base.clone())),
        u64::MAX,
        FaultMode::Fail,
    ));
    let mut total = 0;
    {
        let fs = Fs::mount(
            probe.clone() as Arc<dyn BlockDevice>,
            MountOptions::default(),
        )
        .unwrap();
        let start = probe.io_count();
        let _ = faulty_workload(&fs);
        total = total.max(probe.io_count() - start);
    }
    for (i, mode) in (0..total)
        .step_by(3)
        .zip([FaultMode::Fail, FaultMode::TearWrite].into_iter().cycle())
    {
        let mem = Arc::new(MemDevice::from_bytes(base.clone()));
        let faulty = Arc::new(FaultyDevice::new(mem.clone(), u64::MAX, mode));
        let fs = Fs::mount(
            faulty.clone() as Arc<dyn BlockDevice>,
            MountOptions::default(),
        )
        .unwrap();
        faulty.fail_after(i);
        let committed = faulty_workload(&fs);
        drop(fs);
        // Power comes back: whatever was committed before the failure is there.
        let fs = Fs::mount(mem.clone() as Arc<dyn BlockDevice>, MountOptions::default())
            .unwrap_or_else(|e| panic!("failure at I/O {i}: remount failed: {e}"));
        let got = tree(&fs);
        drop(fs);
        assert_clean(&mem);
        for (path, want) in committed {
            assert_eq!(
                got.get(&path),
                Some(&Some(want)),
                "failure at I/O {i}: lost committed {path}"
            );
        }
    }
}

/// A workload that stops at the first error; returns the files whose commit succeeded.
fn faulty_workload(fs: &Fs) -> Vec<(String, Vec<u8>)> {
    let cr = root();
    let mut committed = Vec::new();
    for i in 0..6u64 {
        let name = format!("f{i}");
        let data = live(i, 30_000);
        let step = || -> extents::Result<()> {
            let f = fs.create(&cr, Ino::ROOT, name.as_bytes(), 0o644)?.ino;
            fs.write(&cr, f, 0, &data)?;
            fs.release(f);
            fs.commit()
        };
        if step().is_err() {
            break;
        }
        committed.push((format!("/{name}"), data));
    }
    committed
}
