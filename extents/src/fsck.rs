//! Checking (and optionally repairing) every invariant of the format on an unmounted
//! device. The check reads the committed store directly, not a mounted filesystem's
//! memory, so it sees exactly what a crash would leave.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use blockdev::BlockDevice;

use crate::alloc::{Allocator, Run};
use crate::error::{FsError, Result};
use crate::extent_map::ExtentMap;
use crate::filesystem::{Fs, MountOptions, read_superblock};
#[cfg(test)]
use crate::format::Superblock;
use crate::format::{InodeRecord, S_IFDIR, S_IFLNK, S_IFMT, Timestamp};
use crate::meta::MetaRegion;
use crate::ops::FileKind;
use crate::store::{self, Batch, Snapshot};
use crate::types::Ino;

/// What fsck found.
#[derive(Debug, Default)]
pub struct FsckReport {
    /// Violated invariants, in plain words.
    pub errors: Vec<String>,
    /// Conditions that are legal but worth knowing (e.g. orphans a mount will remove).
    pub notes: Vec<String>,
    /// What `--repair` changed.
    pub repaired: Vec<String>,
    pub inodes: u64,
    pub directories: u64,
    pub allocated_blocks: u64,
    pub free_blocks: u64,
    pub extents: u64,
}

impl FsckReport {
    /// Exit status following fsck(8): 0 clean, 1 errors corrected, 4 errors left.
    pub fn exit_code(&self) -> i32 {
        if self.errors.is_empty() {
            0
        } else if !self.repaired.is_empty() && self.errors.len() <= self.repaired.len() {
            1
        } else {
            4
        }
    }
}

/// Checks the filesystem on `dev`; with `repair`, fixes what it can and reports it.
/// Returns an error only when the device cannot be read as nearfs at all.
pub fn fsck(dev: Arc<dyn BlockDevice>, repair: bool) -> Result<FsckReport> {
    let sb = read_superblock(dev.as_ref())?;
    let region = MetaRegion::open(dev.clone(), sb.meta_start.0, sb.meta_blocks).map_err(|e| {
        FsError::Corrupt {
            what: format!("metadata region: {e}"),
        }
    })?;
    let db = crate::filesystem::open_db(region, false)?;
    let snap = store::load(&db)?;
    let mut r = FsckReport::default();
    let mut fix = Batch {
        next_ino: snap.next_ino,
        next_generation: snap.next_generation,
        ..Batch::default()
    };
    check(&sb, &snap, &mut r, &mut fix);
    if repair && !fix.is_empty() {
        store::apply(&db, &fix)?;
        drop(db);
        // A clean mount afterwards proves the repair left a consistent filesystem.
        Fs::mount(dev, MountOptions::default())?;
    }
    if !repair {
        r.repaired.clear();
    }
    Ok(r)
}

fn check(sb: &crate::format::Superblock, snap: &Snapshot, r: &mut FsckReport, fix: &mut Batch) {
    let mut alloc = Allocator::new(sb.data_start, sb.data_blocks);
    let mut inodes: BTreeMap<u64, InodeRecord> = BTreeMap::new();
    let mut changed: HashSet<u64> = HashSet::new();

    // Inodes and their extents: inside the data region, no overlap, no block owned twice.
    for (ino, rec) in &snap.inodes {
        let (ino, mut rec) = (*ino, rec.clone());
        if FileKind::from_mode(rec.attrs.mode).is_none() {
            r.errors.push(format!(
                "inode {ino}: unknown file type in mode {:o}",
                rec.attrs.mode
            ));
        }
        if ino >= snap.next_ino {
            r.errors.push(format!(
                "inode {ino}: number is not below the inode counter {}",
                snap.next_ino
            ));
            fix.next_ino = fix.next_ino.max(ino + 1);
            r.repaired
                .push(format!("raised the inode counter past {ino}"));
        }
        if rec.attrs.mode & S_IFMT == S_IFDIR && !rec.extents.is_empty() {
            r.errors.push(format!("directory {ino} owns data extents"));
        }
        if rec.attrs.mode & S_IFMT == S_IFLNK && rec.target.is_empty() {
            r.errors.push(format!("symlink {ino} has no target"));
        }
        let mut kept = Vec::new();
        for e in &rec.extents {
            let bad = if e.len == 0 {
                Some("an empty extent".to_string())
            } else if !sb.in_data_region(e.dev, e.len) {
                Some(format!(
                    "blocks {}+{} outside the data region",
                    e.dev.0, e.len
                ))
            } else if ExtentMap::from_extents(&[kept.as_slice(), &[*e]].concat()).is_none() {
                Some(format!("file blocks {}+{} mapped twice", e.file.0, e.len))
            } else if alloc
                .claim(Run {
                    start: e.dev,
                    len: e.len,
                })
                .is_err()
            {
                Some(format!(
                    "device blocks {}+{} also owned by another inode",
                    e.dev.0, e.len
                ))
            } else {
                None
            };
            match bad {
                Some(why) => {
                    r.errors.push(format!("inode {ino}: {why}"));
                    r.repaired.push(format!(
                        "inode {ino}: dropped {why} (the range now reads as zeros)"
                    ));
                    changed.insert(ino);
                }
                None => kept.push(*e),
            }
        }
        r.extents += kept.len() as u64;
        rec.extents = kept;
        inodes.insert(ino, rec);
    }
    r.inodes = inodes.len() as u64;
    r.directories = inodes
        .values()
        .filter(|i| i.attrs.mode & S_IFMT == S_IFDIR)
        .count() as u64;
    r.free_blocks = alloc.free_blocks();
    r.allocated_blocks = sb.data_blocks - alloc.free_blocks();

    if inodes
        .get(&Ino::ROOT.0)
        .is_none_or(|i| i.attrs.mode & S_IFMT != S_IFDIR)
    {
        r.errors.push("the root directory is missing".into());
        let root = InodeRecord::empty_dir(0o755, 0, 0, Ino::ROOT.0, 0, Timestamp::now());
        inodes.insert(Ino::ROOT.0, root);
        changed.insert(Ino::ROOT.0);
        r.repaired.push("recreated an empty root directory".into());
    }

    // Directory entries: both ends exist, the parent is a directory, names are legal.
    let mut children: BTreeMap<u64, Vec<(Vec<u8>, u64)>> = BTreeMap::new();
    let mut cookies = HashSet::new();
    for (dir, name, child, cookie) in &snap.dirents {
        let shown = String::from_utf8_lossy(name);
        let why = if inodes
            .get(dir)
            .is_none_or(|d| d.attrs.mode & S_IFMT != S_IFDIR)
        {
            Some(format!(
                "entry {shown:?} lives in {dir}, which is not a directory"
            ))
        } else if !inodes.contains_key(child) {
            Some(format!(
                "directory {dir}: entry {shown:?} names missing inode {child}"
            ))
        } else if name.is_empty()
            || name.len() > 255
            || name.contains(&b'/')
            || name == b"."
            || name == b".."
        {
            Some(format!("directory {dir}: illegal name {shown:?}"))
        } else if !cookies.insert((*dir, *cookie)) {
            Some(format!(
                "directory {dir}: entry {shown:?} repeats a readdir cookie"
            ))
        } else {
            None
        };
        match why {
            Some(why) => {
                r.errors.push(why.clone());
                r.repaired.push(format!("removed: {why}"));
                fix.dirents.push(((*dir, name.clone()), None));
            }
            None => children
                .entry(*dir)
                .or_default()
                .push((name.clone(), *child)),
        }
    }

    // Connectivity from the root; each directory reachable exactly once.
    let mut refs: HashMap<u64, u32> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    let mut reached = HashSet::from([Ino::ROOT.0]);
    let mut queue = VecDeque::from([Ino::ROOT.0]);
    while let Some(dir) = queue.pop_front() {
        for (name, child) in children.get(&dir).into_iter().flatten() {
            let is_dir = inodes[child].attrs.mode & S_IFMT == S_IFDIR;
            if is_dir && (*child == Ino::ROOT.0 || reached.contains(child)) {
                let why = format!("directory {child} is linked more than once (again in {dir})");
                r.errors.push(why.clone());
                r.repaired.push(format!("removed the extra entry: {why}"));
                fix.dirents.push(((dir, name.clone()), None));
                continue;
            }
            *refs.entry(*child).or_default() += 1;
            if is_dir {
                *subdirs.entry(dir).or_default() += 1;
                if inodes[child].attrs.parent != dir {
                    r.errors.push(format!(
                        "directory {child}: \"..\" names {} but it lives in {dir}",
                        inodes[child].attrs.parent
                    ));
                    r.repaired
                        .push(format!("directory {child}: \"..\" set to {dir}"));
                    inodes.get_mut(child).expect("exists").attrs.parent = dir;
                    changed.insert(*child);
                }
            }
            if reached.insert(*child) && is_dir {
                queue.push_back(*child);
            }
        }
    }

    // Unreachable inodes: orphans (nlink 0) are legal; anything else was lost.
    let lost: Vec<u64> = inodes
        .keys()
        .copied()
        .filter(|i| !reached.contains(i))
        .collect();
    let mut lost_found = None;
    for ino in lost {
        if inodes[&ino].attrs.nlink == 0 {
            r.notes.push(format!(
                "inode {ino} is an orphan (unlinked while open); the next mount removes it"
            ));
            continue;
        }
        r.errors.push(format!(
            "inode {ino} (nlink {}) is not reachable from the root",
            inodes[&ino].attrs.nlink
        ));
        let lf = match lost_found {
            Some(lf) => lf,
            None => {
                let lf = lost_and_found(&mut inodes, &children, fix, &mut changed);
                if reached.insert(lf) {
                    *subdirs.entry(Ino::ROOT.0).or_default() += 1;
                }
                lost_found = Some(lf);
                lf
            }
        };
        let name = format!("#{ino}").into_bytes();
        let cookie = u64::MAX / 2 + ino;
        fix.dirents.push(((lf, name), Some((ino, cookie))));
        *refs.entry(ino).or_default() += 1;
        if inodes[&ino].attrs.mode & S_IFMT == S_IFDIR {
            *subdirs.entry(lf).or_default() += 1;
            inodes.get_mut(&ino).expect("exists").attrs.parent = lf;
        }
        changed.insert(ino);
        r.repaired
            .push(format!("moved inode {ino} to /lost+found/#{ino}"));
    }

    // Link counts.
    for (&ino, rec) in inodes.iter_mut() {
        if !reached.contains(&ino) && rec.attrs.nlink == 0 {
            continue;
        }
        let want = if rec.attrs.mode & S_IFMT == S_IFDIR {
            2 + subdirs.get(&ino).copied().unwrap_or(0)
        } else {
            refs.get(&ino).copied().unwrap_or(0)
        };
        if rec.attrs.nlink != want && want > 0 {
            r.errors.push(format!(
                "inode {ino}: link count {} but {want} links exist",
                rec.attrs.nlink
            ));
            r.repaired
                .push(format!("inode {ino}: link count set to {want}"));
            rec.attrs.nlink = want;
            changed.insert(ino);
        }
    }
    for ino in changed {
        fix.inodes.push((ino, Some(inodes[&ino].encode())));
    }
}

/// Finds or creates /lost+found for reconnected inodes.
fn lost_and_found(
    inodes: &mut BTreeMap<u64, InodeRecord>,
    children: &BTreeMap<u64, Vec<(Vec<u8>, u64)>>,
    fix: &mut Batch,
    changed: &mut HashSet<u64>,
) -> u64 {
    let existing = children
        .get(&Ino::ROOT.0)
        .and_then(|c| c.iter().find(|(n, _)| n == b"lost+found"))
        .map(|(_, ino)| *ino)
        .filter(|ino| inodes[ino].attrs.mode & S_IFMT == S_IFDIR);
    if let Some(ino) = existing {
        return ino;
    }
    let ino = fix.next_ino;
    fix.next_ino += 1;
    let lost = InodeRecord::empty_dir(
        0o700,
        0,
        0,
        Ino::ROOT.0,
        fix.next_generation,
        Timestamp::now(),
    );
    inodes.insert(ino, lost);
    fix.next_generation += 1;
    fix.dirents.push((
        (Ino::ROOT.0, b"lost+found".to_vec()),
        Some((ino, u64::MAX / 2)),
    ));
    changed.insert(ino);
    ino
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Extent, S_IFREG};
    use crate::types::{DevBlock, FileBlock};
    use crate::{Creds, MkfsOptions};
    use blockdev::MemDevice;

    /// A small filesystem with /dir/file (8 blocks of data).
    fn sample() -> (Arc<MemDevice>, Superblock) {
        let dev = Arc::new(MemDevice::new(32 << 20));
        let sb = Fs::mkfs(dev.clone(), MkfsOptions::default()).unwrap();
        let fs = Fs::mount(dev.clone(), MountOptions::default()).unwrap();
        let cr = Creds::root();
        let d = fs.mkdir(&cr, Ino::ROOT, b"dir", 0o755).unwrap().ino;
        let f = fs.create(&cr, d, b"file", 0o644).unwrap().ino;
        fs.write(&cr, f, 0, &[1; 8 * 4096]).unwrap();
        fs.release(f);
        fs.commit().unwrap();
        (dev, sb)
    }

    /// Applies `damage` to the committed store of `dev`.
    fn damage(dev: &Arc<MemDevice>, sb: &Superblock, damage: impl FnOnce(&Snapshot, &mut Batch)) {
        let region = MetaRegion::open(dev.clone(), sb.meta_start.0, sb.meta_blocks).unwrap();
        let db = crate::filesystem::open_db(region, false).unwrap();
        let snap = store::load(&db).unwrap();
        let mut batch = Batch {
            next_ino: snap.next_ino,
            next_generation: snap.next_generation,
            ..Batch::default()
        };
        damage(&snap, &mut batch);
        store::apply(&db, &batch).unwrap();
    }

    fn run(dev: &Arc<MemDevice>, repair: bool) -> FsckReport {
        fsck(dev.clone(), repair).unwrap()
    }

    fn inode(snap: &Snapshot, pred: impl Fn(&InodeRecord) -> bool) -> (u64, &InodeRecord) {
        snap.inodes
            .iter()
            .find(|(_, r)| pred(r))
            .map(|(i, r)| (*i, r))
            .unwrap()
    }

    #[test]
    fn a_fresh_filesystem_is_clean() {
        let (dev, _) = sample();
        let r = run(&dev, false);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.exit_code(), 0);
        assert_eq!((r.inodes, r.directories, r.extents), (3, 2, 1));
        assert_eq!(r.allocated_blocks, 8);
    }

    #[test]
    fn shared_blocks_are_found_and_dropped_from_one_owner() {
        let (dev, sb) = sample();
        damage(&dev, &sb, |snap, b| {
            let (_, file) = inode(snap, |r| r.attrs.mode & S_IFMT == S_IFREG);
            let mut thief = file.clone();
            thief.extents = vec![Extent {
                file: FileBlock(0),
                dev: file.extents[0].dev,
                len: 2,
                unwritten: false,
            }];
            b.inodes.push((99, Some(thief.encode())));
            b.dirents
                .push(((Ino::ROOT.0, b"thief".to_vec()), Some((99, 77))));
            b.next_ino = 100;
        });
        let r = run(&dev, false);
        assert!(
            r.errors
                .iter()
                .any(|e| e.contains("also owned by another inode")),
            "{:?}",
            r.errors
        );
        assert_eq!(r.exit_code(), 4);
        assert!(
            Fs::mount(dev.clone(), MountOptions::default()).is_err(),
            "mount must refuse"
        );
        assert_eq!(run(&dev, true).exit_code(), 1);
        assert!(run(&dev, false).errors.is_empty());
    }

    #[test]
    fn dangling_entries_wrong_link_counts_and_lost_inodes_are_repaired() {
        let (dev, sb) = sample();
        damage(&dev, &sb, |snap, b| {
            // An entry naming nothing, a wrong link count, and a file no directory names.
            b.dirents
                .push(((Ino::ROOT.0, b"ghost".to_vec()), Some((4242, 90))));
            let (ino, file) = inode(snap, |r| r.attrs.mode & S_IFMT == S_IFREG);
            let mut f = file.clone();
            f.attrs.nlink = 5;
            b.inodes.push((ino, Some(f.encode())));
            let mut lost = file.clone();
            lost.extents.clear();
            b.inodes.push((50, Some(lost.encode())));
            b.next_ino = 51;
        });
        let r = run(&dev, false);
        let text = r.errors.join("\n");
        assert!(text.contains("names missing inode 4242"), "{text}");
        assert!(text.contains("link count 5 but 1"), "{text}");
        assert!(
            text.contains("inode 50 (nlink 1) is not reachable"),
            "{text}"
        );
        let r = run(&dev, true);
        assert_eq!(r.exit_code(), 1, "{:?}", r.errors);
        let r = run(&dev, false);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let fs = Fs::mount(dev.clone(), MountOptions::default()).unwrap();
        let lf = fs
            .lookup(&Creds::root(), Ino::ROOT, b"lost+found")
            .unwrap()
            .ino;
        fs.lookup(&Creds::root(), lf, b"#50").unwrap();
    }

    #[test]
    fn extents_outside_the_data_region_are_reported() {
        let (dev, sb) = sample();
        damage(&dev, &sb, |snap, b| {
            let (ino, file) = inode(snap, |r| r.attrs.mode & S_IFMT == S_IFREG);
            let mut f = file.clone();
            f.extents.push(Extent {
                file: FileBlock(100),
                dev: DevBlock(1),
                len: 1,
                unwritten: false,
            });
            b.inodes.push((ino, Some(f.encode())));
        });
        let r = run(&dev, false);
        assert!(
            r.errors
                .iter()
                .any(|e| e.contains("outside the data region")),
            "{:?}",
            r.errors
        );
    }
}
