//! The filesystem core driven in-process over an in-memory device.

mod common;

use std::sync::Arc;

use blockdev::{BlockDevice, MemDevice};
use common::*;
use extents::{
    Creds, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, Fs, FsError, Ino,
    MkfsOptions, MountOptions, OpenMode, RenameFlags, SEEK_DATA, SEEK_HOLE, SetAttr, TimeSet,
    XATTR_CREATE, XATTR_REPLACE,
};

const BS: u64 = 4096;

#[test]
fn committed_changes_survive_remount_and_uncommitted_ones_vanish() {
    let (dev, fs) = fresh(64 * MIB);
    let d = fs.mkdir(&root(), Ino::ROOT, b"dir", 0o755).unwrap().ino;
    put(&fs, d, "a", b"alpha");
    put(&fs, Ino::ROOT, "big", &pattern(1, 3 * MIB as usize + 17));
    fs.symlink(&root(), d, b"link", b"../big").unwrap();
    fs.commit().unwrap();
    let before = tree(&fs);
    put(&fs, Ino::ROOT, "late", b"not committed");
    drop(fs); // like a power cut: no final commit

    let fs = mount(&dev);
    assert_eq!(tree(&fs), before);
    assert_clean(&dev);
}

#[test]
fn holes_and_regrown_tails_read_as_zeros() {
    let (_dev, fs) = fresh(64 * MIB);
    let f = fs.create(&root(), Ino::ROOT, b"f", 0o644).unwrap().ino;
    fs.write(&root(), f, MIB, b"end").unwrap();
    let data = get(&fs, f);
    assert_eq!(data.len() as u64, MIB + 3);
    assert!(data[..MIB as usize].iter().all(|&b| b == 0));
    assert_eq!(
        fs.extents(f).unwrap().len(),
        1,
        "only the written block is allocated"
    );

    put(&fs, Ino::ROOT, "g", &[0xAB; 8192]);
    let g = resolve(&fs, "g").unwrap();
    fs.setattr(
        &root(),
        g,
        SetAttr {
            size: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    fs.setattr(
        &root(),
        g,
        SetAttr {
            size: Some(8192),
            ..Default::default()
        },
    )
    .unwrap();
    let data = get(&fs, g);
    assert!(data[..100].iter().all(|&b| b == 0xAB));
    assert!(
        data[100..].iter().all(|&b| b == 0),
        "bytes past a shrink came back"
    );
}

/// The daemon keeps one buffer per thread for reads: a read into a buffer that holds
/// another file's bytes hands back only this file's, with zeros for its holes and
/// unwritten blocks.
#[test]
fn reads_into_a_kept_buffer_show_nothing_it_held_before() {
    let (_dev, fs) = fresh(64 * MIB);
    let secret = put(&fs, Ino::ROOT, "secret", &[0x5e; 3 * BS as usize]);
    let f = fs.create(&root(), Ino::ROOT, b"sparse", 0o644).unwrap().ino;
    fs.write(&root(), f, BS, &[7; 10]).unwrap();
    fs.fallocate(f, 2 * BS, BS, 0).unwrap();
    fs.write(&root(), f, 3 * BS + 5, &[9; 3]).unwrap();
    let mut want = vec![0u8; 3 * BS as usize + 8];
    want[BS as usize..BS as usize + 10].fill(7);
    want[3 * BS as usize + 5..].fill(9);
    let mut buf = blockdev::AlignedBuf::new(0);
    for (off, len) in [
        (0, 3 * BS as u32 + 8),
        (1, 3 * BS as u32),
        (BS + 3, 2 * BS as u32),
    ] {
        let at = fs.read_into(secret, 0, 3 * BS as u32, &mut buf).unwrap();
        assert!(buf[at].iter().all(|&b| b == 0x5e));
        let at = fs.read_into(f, off, len, &mut buf).unwrap();
        let end = (off + u64::from(len)).min(want.len() as u64) as usize;
        assert_eq!(&buf[at], &want[off as usize..end], "read of {len} at {off}");
    }
}

#[test]
fn freed_blocks_never_show_through_another_file() {
    let (dev, fs) = fresh(32 * MIB);
    let secret = put(&fs, Ino::ROOT, "secret", &[0x5A; 64 * 1024]);
    let old: Vec<_> = fs.extents(secret).unwrap();
    fs.commit().unwrap();
    fs.unlink(&root(), Ino::ROOT, b"secret").unwrap();

    // Before the unlink is durable, its blocks must not be handed out again.
    let b = put(&fs, Ino::ROOT, "b", &[1; 64 * 1024]);
    for e in fs.extents(b).unwrap() {
        for o in &old {
            assert!(
                e.dev.0 + e.len <= o.dev.0 || o.dev.0 + o.len <= e.dev.0,
                "reused too early"
            );
        }
    }
    fs.commit().unwrap();
    // Once durable they may be reused, but partially written blocks show zeros, not 0x5A.
    for i in 0..64 {
        let f = fs
            .create(&root(), Ino::ROOT, format!("n{i}").as_bytes(), 0o644)
            .unwrap()
            .ino;
        fs.write(&root(), f, 1000, b"x").unwrap();
        fs.setattr(
            &root(),
            f,
            SetAttr {
                size: Some(BS * 2),
                ..Default::default()
            },
        )
        .unwrap();
        let data = get(&fs, f);
        assert!(
            !data.contains(&0x5A),
            "file n{i} shows a deleted file's bytes"
        );
        fs.release(f);
    }
    fs.commit().unwrap();
    assert_clean(&dev);
}

#[test]
fn appends_stay_contiguous_even_when_interleaved() {
    let (_dev, fs) = fresh(128 * MIB);
    let a = fs.create(&root(), Ino::ROOT, b"a", 0o644).unwrap().ino;
    let b = fs.create(&root(), Ino::ROOT, b"b", 0o644).unwrap().ino;
    let chunk = vec![7u8; 64 * 1024];
    for i in 0..100u64 {
        fs.write(&root(), a, i * chunk.len() as u64, &chunk)
            .unwrap();
        fs.write(&root(), b, i * chunk.len() as u64, &chunk)
            .unwrap();
    }
    assert_eq!(fs.extents(a).unwrap().len(), 1, "{:?}", fs.extents(a));
    assert_eq!(fs.extents(b).unwrap().len(), 1, "{:?}", fs.extents(b));
}

#[test]
fn rename_follows_posix() {
    let (dev, fs) = fresh(32 * MIB);
    let cr = root();
    let d1 = fs.mkdir(&cr, Ino::ROOT, b"d1", 0o755).unwrap().ino;
    let d2 = fs.mkdir(&cr, Ino::ROOT, b"d2", 0o755).unwrap().ino;
    let sub = fs.mkdir(&cr, d1, b"sub", 0o755).unwrap().ino;
    put(&fs, d1, "f", b"f");
    put(&fs, d2, "g", b"g");
    let none = RenameFlags::default();

    // Replace a file; the replaced inode is gone.
    fs.rename(&cr, d1, b"f", d2, b"g", none).unwrap();
    assert_eq!(get(&fs, resolve(&fs, "d2/g").unwrap()), b"f");
    assert!(matches!(resolve(&fs, "d1/f"), Err(FsError::NotFound)));
    // A directory cannot move below itself or onto a non-empty directory.
    assert!(matches!(
        fs.rename(&cr, Ino::ROOT, b"d1", sub, b"x", none),
        Err(FsError::Invalid(_))
    ));
    fs.mkdir(&cr, d2, b"full", 0o755).unwrap();
    put(&fs, resolve(&fs, "d2/full").unwrap(), "x", b"");
    assert!(matches!(
        fs.rename(&cr, d1, b"sub", d2, b"full", none),
        Err(FsError::NotEmpty)
    ));
    assert!(matches!(
        fs.rename(&cr, d2, b"g", Ino::ROOT, b"d1", none),
        Err(FsError::IsDir)
    ));
    assert!(matches!(
        fs.rename(&cr, Ino::ROOT, b"d1", d2, b"g", none),
        Err(FsError::NotDir)
    ));
    // Moving a directory moves its link from one parent to the other.
    fs.rename(&cr, d1, b"sub", d2, b"sub", none).unwrap();
    assert_eq!(fs.getattr(d1).unwrap().nlink, 2);
    assert_eq!(fs.getattr(d2).unwrap().nlink, 4);
    assert_eq!(fs.lookup(&cr, sub, b"..").unwrap().ino, d2);
    // NOREPLACE and EXCHANGE.
    let noreplace = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    assert!(matches!(
        fs.rename(&cr, d2, b"g", d2, b"sub", noreplace),
        Err(FsError::Exists)
    ));
    let exchange = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    fs.rename(&cr, d2, b"g", Ino::ROOT, b"d1", exchange)
        .unwrap();
    assert_eq!(fs.lookup(&cr, d2, b"g").unwrap().ino, d1);
    assert_eq!(get(&fs, resolve(&fs, "d1").unwrap()), b"f");
    assert_eq!(fs.lookup(&cr, d1, b"..").unwrap().ino, d2);
    assert!(matches!(
        fs.rename(&cr, d2, b"nope", d2, b"g", exchange),
        Err(FsError::NotFound)
    ));
    fs.commit().unwrap();
    assert_clean(&dev);
}

#[test]
fn links_and_removal_keep_counts_and_refuse_misuse() {
    let (dev, fs) = fresh(32 * MIB);
    let cr = root();
    let f = put(&fs, Ino::ROOT, "f", b"data");
    fs.link(&cr, f, Ino::ROOT, b"f2").unwrap();
    assert_eq!(fs.getattr(f).unwrap().nlink, 2);
    let d = fs.mkdir(&cr, Ino::ROOT, b"d", 0o755).unwrap().ino;
    assert!(matches!(
        fs.link(&cr, d, Ino::ROOT, b"d2"),
        Err(FsError::NotPermitted)
    ));
    assert!(matches!(
        fs.unlink(&cr, Ino::ROOT, b"d"),
        Err(FsError::IsDir)
    ));
    assert!(matches!(
        fs.rmdir(&cr, Ino::ROOT, b"f"),
        Err(FsError::NotDir)
    ));
    put(&fs, d, "x", b"");
    assert!(matches!(
        fs.rmdir(&cr, Ino::ROOT, b"d"),
        Err(FsError::NotEmpty)
    ));
    assert!(matches!(
        fs.mkdir(&cr, Ino::ROOT, b"f", 0o755),
        Err(FsError::Exists)
    ));
    let long = vec![b'n'; 256];
    assert!(matches!(
        fs.mknod(&cr, Ino::ROOT, &long, 0o644, 0),
        Err(FsError::NameTooLong)
    ));
    assert!(matches!(
        fs.lookup(&cr, Ino::ROOT, &long),
        Err(FsError::NameTooLong)
    ));
    fs.unlink(&cr, Ino::ROOT, b"f").unwrap();
    assert_eq!(get(&fs, resolve(&fs, "f2").unwrap()), b"data");
    fs.commit().unwrap();
    assert_clean(&dev);
}

#[test]
fn unlinked_open_files_live_until_release_and_orphans_are_reaped_at_mount() {
    let (dev, fs) = fresh(32 * MIB);
    let f = put(&fs, Ino::ROOT, "f", &pattern(3, 100_000));
    fs.open(
        &root(),
        f,
        OpenMode {
            read: true,
            write: true,
        },
    )
    .unwrap();
    let free_before = fs.info().free_blocks;
    fs.unlink(&root(), Ino::ROOT, b"f").unwrap();
    assert_eq!(get(&fs, f), pattern(3, 100_000), "open file still readable");
    fs.commit().unwrap();
    assert_eq!(
        fs.info().free_blocks,
        free_before,
        "blocks of an open file stay allocated"
    );
    drop(fs); // crash while the file is still open

    let fs = mount(&dev);
    assert!(
        matches!(fs.getattr(f), Err(FsError::NotFound)),
        "orphan removed at mount"
    );
    assert_eq!(fs.info().free_blocks, free_before + 25);
    assert_clean(&dev);
}

#[test]
fn permissions_follow_mode_bits_groups_and_sticky() {
    let (_dev, fs) = fresh(32 * MIB);
    let r = root();
    let alice = Creds {
        uid: 1000,
        gid: 1000,
        groups: vec![50],
    };
    let bob = Creds::user(1001, 1001);
    assert!(matches!(
        fs.mkdir(&alice, Ino::ROOT, b"x", 0o755),
        Err(FsError::AccessDenied)
    ));
    let tmp = fs.mkdir(&r, Ino::ROOT, b"tmp", 0o1777).unwrap().ino;
    let af = fs.create(&alice, tmp, b"a", 0o640).unwrap();
    assert_eq!((af.uid, af.gid), (1000, 1000));
    assert!(
        matches!(fs.unlink(&bob, tmp, b"a"), Err(FsError::NotPermitted)),
        "sticky"
    );
    assert!(matches!(
        fs.open(
            &bob,
            af.ino,
            OpenMode {
                read: true,
                write: false
            }
        ),
        Err(FsError::AccessDenied)
    ));
    // chmod and chown rules.
    let chmod = SetAttr {
        mode: Some(0o666),
        ..Default::default()
    };
    assert!(matches!(
        fs.setattr(&bob, af.ino, chmod),
        Err(FsError::NotPermitted)
    ));
    let give = SetAttr {
        uid: Some(1001),
        ..Default::default()
    };
    assert!(matches!(
        fs.setattr(&alice, af.ino, give),
        Err(FsError::NotPermitted)
    ));
    let chgrp = SetAttr {
        gid: Some(50),
        ..Default::default()
    };
    assert_eq!(fs.setattr(&alice, af.ino, chgrp).unwrap().gid, 50);
    let chgrp_other = SetAttr {
        gid: Some(51),
        ..Default::default()
    };
    assert!(matches!(
        fs.setattr(&alice, af.ino, chgrp_other),
        Err(FsError::NotPermitted)
    ));
    // Group read through a supplementary group.
    let carol = Creds {
        uid: 1002,
        gid: 1002,
        groups: vec![7, 50],
    };
    fs.open(
        &carol,
        af.ino,
        OpenMode {
            read: true,
            write: false,
        },
    )
    .unwrap();
    // Setting times: "now" needs write access, an explicit time needs ownership.
    let now = SetAttr {
        mtime: Some(TimeSet::Now),
        ..Default::default()
    };
    assert!(matches!(
        fs.setattr(&bob, af.ino, now),
        Err(FsError::AccessDenied)
    ));
    let at = SetAttr {
        mtime: Some(TimeSet::At(Default::default())),
        ..Default::default()
    };
    assert!(matches!(
        fs.setattr(&carol, af.ino, at),
        Err(FsError::NotPermitted)
    ));
    // setgid directories pass their group (and the bit, to subdirectories) on.
    let shared = fs.mkdir(&r, Ino::ROOT, b"shared", 0o2777).unwrap().ino;
    fs.setattr(
        &r,
        shared,
        SetAttr {
            gid: Some(77),
            ..Default::default()
        },
    )
    .unwrap();
    let sub = fs.mkdir(&alice, shared, b"sub", 0o755).unwrap();
    assert_eq!(sub.gid, 77);
    assert_eq!(sub.perm & 0o2000, 0o2000);
    // chown clears set-user-ID.
    let exe = fs.create(&r, Ino::ROOT, b"exe", 0o4755).unwrap().ino;
    let a = fs
        .setattr(
            &r,
            exe,
            SetAttr {
                uid: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.perm & 0o4000, 0);
}

#[test]
fn xattrs_persist_and_respect_flags() {
    let (dev, fs) = fresh(32 * MIB);
    let cr = root();
    let f = put(&fs, Ino::ROOT, "f", b"");
    fs.setxattr(&cr, f, b"user.color", b"blue", 0).unwrap();
    assert!(matches!(
        fs.setxattr(&cr, f, b"user.color", b"x", XATTR_CREATE),
        Err(FsError::Exists)
    ));
    assert!(matches!(
        fs.setxattr(&cr, f, b"user.none", b"x", XATTR_REPLACE),
        Err(FsError::NoAttribute)
    ));
    assert!(matches!(
        fs.setxattr(&cr, f, b"user.nearfs.extents", b"x", 0),
        Err(FsError::NotPermitted)
    ));
    assert!(matches!(
        fs.setxattr(&cr, f, b"user.big", &vec![0; 65537], 0),
        Err(FsError::ValueTooLarge)
    ));
    assert!(matches!(
        fs.setxattr(&cr, f, b"os2.x", b"", 0),
        Err(FsError::Unsupported(_))
    ));
    fs.setxattr(&cr, f, b"user.gone", b"1", 0).unwrap();
    fs.removexattr(&cr, f, b"user.gone").unwrap();
    fs.commit().unwrap();
    let fs = mount(&dev);
    let f = resolve(&fs, "f").unwrap();
    assert_eq!(fs.getxattr(&cr, f, b"user.color").unwrap(), b"blue");
    assert_eq!(fs.listxattr(&cr, f).unwrap(), vec![b"user.color".to_vec()]);
    assert!(matches!(
        fs.getxattr(&cr, f, b"user.gone"),
        Err(FsError::NoAttribute)
    ));
    let stranger = Creds::user(5, 5);
    fs.setattr(
        &cr,
        f,
        SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        fs.getxattr(&stranger, f, b"user.color"),
        Err(FsError::AccessDenied)
    ));
}

#[test]
fn fallocate_punch_and_seek_data_hole() {
    let (dev, fs) = fresh(32 * MIB);
    let f = fs.create(&root(), Ino::ROOT, b"f", 0o644).unwrap().ino;
    fs.fallocate(f, 0, 1 << 20, FALLOC_FL_KEEP_SIZE).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 0);
    assert!(fs.extents(f).unwrap().iter().all(|e| e.unwritten));
    fs.fallocate(f, 0, 1 << 20, 0).unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 1 << 20);
    assert!(
        get(&fs, f).iter().all(|&b| b == 0),
        "unwritten extents read as zeros"
    );
    fs.write(&root(), f, 3 * BS + 10, b"hello").unwrap();
    assert_eq!(fs.lseek(f, 0, SEEK_DATA).unwrap(), 3 * BS);
    assert_eq!(fs.lseek(f, 3 * BS, SEEK_HOLE).unwrap(), 4 * BS);
    let data = get(&fs, f);
    assert_eq!(&data[3 * BS as usize + 10..3 * BS as usize + 15], b"hello");
    assert!(
        data[3 * BS as usize..3 * BS as usize + 10]
            .iter()
            .all(|&b| b == 0)
    );

    put(&fs, Ino::ROOT, "g", &[9; 5 * BS as usize]);
    let g = resolve(&fs, "g").unwrap();
    fs.fallocate(
        g,
        BS - 1,
        2 * BS + 2,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    )
    .unwrap();
    let data = get(&fs, g);
    assert_eq!(data.len() as u64, 5 * BS);
    assert!(data[..BS as usize - 1].iter().all(|&b| b == 9));
    assert!(
        data[BS as usize - 1..3 * BS as usize + 1]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(data[3 * BS as usize + 1..].iter().all(|&b| b == 9));
    assert_eq!(fs.lseek(g, BS, SEEK_DATA).unwrap(), 3 * BS);
    assert!(matches!(
        fs.lseek(g, 5 * BS, SEEK_DATA),
        Err(FsError::NoData)
    ));
    fs.fallocate(g, 0, 5 * BS, FALLOC_FL_ZERO_RANGE).unwrap();
    assert!(get(&fs, g).iter().all(|&b| b == 0));
    assert!(matches!(
        fs.fallocate(g, 0, BS, FALLOC_FL_PUNCH_HOLE),
        Err(FsError::Unsupported(_))
    ));
    fs.commit().unwrap();
    assert_clean(&dev);
}

#[test]
fn a_full_device_gives_nospace_and_loses_nothing() {
    let (dev, fs) = fresh(16 * MIB);
    let keep = put(&fs, Ino::ROOT, "keep", &pattern(9, 100_000));
    fs.commit().unwrap();
    let fill = fs.create(&root(), Ino::ROOT, b"fill", 0o644).unwrap().ino;
    let chunk = vec![3u8; 256 * 1024];
    let mut off = 0;
    for size in [chunk.len(), BS as usize] {
        let err = loop {
            match fs.write(&root(), fill, off, &chunk[..size]) {
                Ok(n) => off += n as u64,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, FsError::NoSpace), "{err}");
    }
    assert_eq!(fs.info().free_blocks, 0);
    assert_eq!(
        fs.getattr(fill).unwrap().size,
        off,
        "a failed write changes nothing"
    );
    assert!(matches!(
        fs.write(&root(), keep, 200_000, b"x"),
        Err(FsError::NoSpace)
    ));
    assert_eq!(get(&fs, keep), pattern(9, 100_000));
    // Cutting a file inside a block needs a block for the copy of its tail: without one
    // the truncation fails and changes nothing.
    let cut = SetAttr {
        size: Some(50_001),
        ..Default::default()
    };
    assert!(matches!(
        fs.setattr(&root(), keep, cut),
        Err(FsError::NoSpace)
    ));
    assert_eq!(get(&fs, keep), pattern(9, 100_000));
    fs.commit().unwrap();
    assert_clean(&dev);
    // Space freed but not yet committed is reclaimed by committing on demand.
    fs.release(fill);
    fs.unlink(&root(), Ino::ROOT, b"fill").unwrap();
    put(&fs, Ino::ROOT, "after", &chunk);
    fs.setattr(&root(), keep, cut).unwrap();
    assert_eq!(get(&fs, keep), pattern(9, 100_000)[..50_001]);
}

#[test]
fn read_only_mounts_refuse_changes() {
    let dev = formatted(32 * MIB);
    let fs = Fs::mount(
        dev.clone() as Arc<dyn BlockDevice>,
        MountOptions {
            read_only: true,
            kernel_refs: false,
        },
    )
    .unwrap();
    assert!(matches!(
        fs.mkdir(&root(), Ino::ROOT, b"d", 0o755),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        fs.open(
            &root(),
            Ino::ROOT,
            OpenMode {
                read: false,
                write: true
            }
        ),
        Err(FsError::IsDir)
    ));
}

#[test]
fn mkfs_refuses_to_overwrite_without_force() {
    let dev = formatted(32 * MIB);
    let again = Fs::mkfs(dev.clone(), MkfsOptions::default());
    assert!(matches!(again, Err(FsError::Exists)));
    Fs::mkfs(
        dev,
        MkfsOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap();
}

#[test]
fn damaged_images_are_refused_with_a_reason_never_a_panic() {
    let good = formatted(32 * MIB).snapshot();
    let try_mount = |bytes: Vec<u8>| {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(bytes));
        Fs::mount(dev, MountOptions::default())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(try_mount(bad).unwrap_err().contains("magic"));
    let mut bad = good.clone();
    bad[200] ^= 0xff;
    assert!(try_mount(bad).unwrap_err().contains("checksum"));
    let short = good[..20 * MIB as usize].to_vec();
    assert!(try_mount(short).unwrap_err().contains("truncated"));
    assert!(try_mount(vec![0; 100]).is_err());
    let mut bad = good.clone();
    bad[4096..8192].fill(0xEE);
    assert!(try_mount(bad).unwrap_err().contains("metadata"));

    // Random damage inside the metadata store: an error or a clean mount, never a panic.
    let used = 64 * 1024;
    for i in 0..40u64 {
        let mut bad = good.clone();
        let at = 8192
            + (pattern(i, 8)
                .iter()
                .fold(0u64, |a, &b| a * 256 + u64::from(b))
                % used) as usize;
        bad[at..at + 16].copy_from_slice(&pattern(i + 100, 16));
        if try_mount(bad.clone()).is_ok() {
            let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(bad));
            let _ = extents::fsck::fsck(dev, false);
        }
    }
}

#[test]
fn concurrent_writers_and_readers_agree() {
    let (dev, fs) = fresh(128 * MIB);
    let fs = Arc::new(fs);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let name = format!("t{t}");
                let f = fs
                    .create(&root(), Ino::ROOT, name.as_bytes(), 0o644)
                    .unwrap()
                    .ino;
                let data = pattern(t, 2 * MIB as usize);
                for (i, chunk) in data.chunks(100_000).enumerate() {
                    fs.write(&root(), f, i as u64 * 100_000, chunk).unwrap();
                    let back = fs.read(f, i as u64 * 100_000, chunk.len() as u32).unwrap();
                    assert_eq!(back, chunk);
                    if i % 5 == 0 {
                        fs.commit().unwrap();
                    }
                }
                fs.release(f);
                (f, data)
            })
        })
        .collect();
    for t in threads {
        let (f, data) = t.join().unwrap();
        assert_eq!(get(&fs, f), data);
    }
    fs.commit().unwrap();
    assert_clean(&dev);
}
