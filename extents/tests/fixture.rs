//! The frozen version-1 image (`tests/fixtures/v1.img.gz`) must mount, pass fsck and hold
//! exactly what was written into it — in this version and every later one.
//!
//! To regenerate it (only when deliberately freezing a new format version):
//! `NEARFS_WRITE_FIXTURE=1 cargo test -p extents --test fixture`.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use blockdev::{BlockDevice, MemDevice};
use common::*;
use extents::format::Timestamp;
use extents::{FALLOC_FL_KEEP_SIZE, Fs, Ino, MountOptions, SetAttr, TimeSet};

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1.img.gz")
}

/// What the fixture holds; written once, checked forever.
fn populate(fs: &Fs) {
    let cr = root();
    let d = fs.mkdir(&cr, Ino::ROOT, b"dir", 0o750).unwrap().ino;
    put(fs, d, "small", b"nearfs format 1\n");
    let big = put(fs, Ino::ROOT, "big", &pattern(1, 30_000));
    fs.write(&cr, big, 1 << 20, b"after a hole").unwrap();
    fs.fallocate(big, 2 << 20, 64 * 1024, FALLOC_FL_KEEP_SIZE)
        .unwrap();
    fs.setxattr(&cr, big, b"user.origin", b"fixture", 0)
        .unwrap();
    fs.symlink(&cr, d, b"link", b"../big").unwrap();
    fs.link(&cr, big, d, b"big-again").unwrap();
    let when = TimeSet::At(Timestamp {
        secs: 1_700_000_000,
        nanos: 5,
    });
    fs.setattr(
        &cr,
        big,
        SetAttr {
            mtime: Some(when),
            uid: Some(1000),
            gid: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    fs.commit().unwrap();
}

#[test]
fn version_1_fixture_mounts_and_holds_its_files() {
    if std::env::var_os("NEARFS_WRITE_FIXTURE").is_some() {
        let (dev, fs) = fresh(16 * MIB);
        populate(&fs);
        drop(fs);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&dev.snapshot()).unwrap();
        std::fs::write(fixture_path(), gz.finish().unwrap()).unwrap();
    }
    let mut image = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(fixture_path()).expect("fixture present"))
        .read_to_end(&mut image)
        .unwrap();
    let dev = Arc::new(MemDevice::from_bytes(image));
    assert_clean(&dev);
    let fs = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, MountOptions::default()).unwrap();

    let (_, expected) = fresh(16 * MIB);
    populate(&expected);
    assert_eq!(tree(&fs), tree(&expected));
    let big = resolve(&fs, "big").unwrap();
    let a = fs.getattr(big).unwrap();
    assert_eq!(
        (a.uid, a.gid, a.nlink, a.size),
        (1000, 100, 2, (1 << 20) + 12)
    );
    assert_eq!(
        a.mtime,
        Timestamp {
            secs: 1_700_000_000,
            nanos: 5
        }
    );
    assert_eq!(
        fs.getxattr(&root(), big, b"user.origin").unwrap(),
        b"fixture"
    );
    let ext = fs.extents(big).unwrap();
    assert!(
        ext.iter().any(|e| e.unwritten),
        "the preallocated extent survives: {ext:?}"
    );
    assert_eq!(
        fs.getattr(resolve(&fs, "dir").unwrap()).unwrap().perm,
        0o750
    );
}
