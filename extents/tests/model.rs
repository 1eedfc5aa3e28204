//! Random operation sequences run on the filesystem and on a simple in-memory model must
//! agree — after every operation, across remounts, and after fsck.

mod common;

use std::collections::BTreeMap;

use common::*;
use extents::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FsError, Ino, RenameFlags, SetAttr};
use proptest::prelude::*;

const NAMES: [&str; 5] = ["a", "b", "c", "d/x", "d/y"];

#[derive(Clone, Debug)]
enum Op {
    Write {
        file: usize,
        offset: u32,
        len: u16,
        seed: u8,
    },
    Truncate {
        file: usize,
        size: u32,
    },
    Punch {
        file: usize,
        offset: u32,
        len: u16,
    },
    Unlink {
        file: usize,
    },
    Rename {
        from: usize,
        to: usize,
    },
    Commit,
    Remount,
}

fn op() -> impl Strategy<Value = Op> {
    let file = 0..NAMES.len();
    prop_oneof![
        6 => (file.clone(), 0u32..300_000, 1u16..20_000, any::<u8>())
            .prop_map(|(file, offset, len, seed)| Op::Write { file, offset, len, seed }),
        2 => (file.clone(), 0u32..300_000).prop_map(|(file, size)| Op::Truncate { file, size }),
        1 => (file.clone(), 0u32..300_000, 1u16..30_000).prop_map(|(file, offset, len)| Op::Punch { file, offset, len }),
        1 => file.clone().prop_map(|file| Op::Unlink { file }),
        1 => (file.clone(), file).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => Just(Op::Commit),
        1 => Just(Op::Remount),
    ]
}

fn parent_and_name(fs: &extents::Fs, path: &str) -> (Ino, String) {
    match path.split_once('/') {
        Some((dir, name)) => (resolve(fs, dir).unwrap(), name.to_string()),
        None => (Ino::ROOT, path.to_string()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn filesystem_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let (dev, mut fs) = fresh(64 * MIB);
        fs.mkdir(&root(), Ino::ROOT, b"d", 0o755).unwrap();
        let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Write { file, offset, len, seed } => {
                    let path = NAMES[file];
                    let (dir, name) = parent_and_name(&fs, path);
                    let ino = match fs.lookup(&root(), dir, name.as_bytes()) {
                        Ok(a) => a.ino,
                        Err(_) => {
                            let a = fs.create(&root(), dir, name.as_bytes(), 0o644).unwrap();
                            fs.release(a.ino);
                            a.ino
                        }
                    };
                    let data = pattern(u64::from(seed), usize::from(len));
                    fs.write(&root(), ino, u64::from(offset), &data).unwrap();
                    let m = model.entry(path.to_string()).or_default();
                    let end = offset as usize + data.len();
                    if m.len() < end { m.resize(end, 0); }
                    m[offset as usize..end].copy_from_slice(&data);
                }
                Op::Truncate { file, size } => {
                    let Some(m) = model.get_mut(NAMES[file]) else { continue };
                    let ino = resolve(&fs, NAMES[file]).unwrap();
                    fs.setattr(&root(), ino, SetAttr { size: Some(u64::from(size)), ..Default::default() }).unwrap();
                    m.resize(size as usize, 0);
                }
                Op::Punch { file, offset, len } => {
                    let Some(m) = model.get_mut(NAMES[file]) else { continue };
                    let ino = resolve(&fs, NAMES[file]).unwrap();
                    fs.fallocate(ino, u64::from(offset), u64::from(len), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE).unwrap();
                    let end = (offset as usize + len as usize).min(m.len());
                    if (offset as usize) < end { m[offset as usize..end].fill(0); }
                }
                Op::Unlink { file } => {
                    let (dir, name) = parent_and_name(&fs, NAMES[file]);
                    let r = fs.unlink(&root(), dir, name.as_bytes());
                    prop_assert_eq!(r.is_ok(), model.remove(NAMES[file]).is_some());
                }
                Op::Rename { from, to } => {
                    let (fd, fname) = parent_and_name(&fs, NAMES[from]);
                    let (td, tname) = parent_and_name(&fs, NAMES[to]);
                    let r = fs.rename(&root(), fd, fname.as_bytes(), td, tname.as_bytes(), RenameFlags::default());
                    match model.remove(NAMES[from]) {
                        Some(m) => { r.unwrap(); model.insert(NAMES[to].to_string(), m); }
                        None => prop_assert!(matches!(r, Err(FsError::NotFound))),
                    }
                }
                Op::Commit => fs.commit().unwrap(),
                Op::Remount => {
                    fs.commit().unwrap();
                    drop(fs);
                    fs = mount(&dev);
                }
            }
            let mut want: BTreeMap<String, Option<Vec<u8>>> =
                model.iter().map(|(k, v)| (format!("/{k}"), Some(v.clone()))).collect();
            want.insert("/d".into(), None);
            prop_assert_eq!(tree(&fs), want);
        }
        fs.commit().unwrap();
        assert_clean(&dev);
    }
}
