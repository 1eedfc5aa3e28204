//! Building the in-memory state from a committed snapshot, refusing inconsistent metadata.
//! `fsck` reports the same problems in detail; mount only needs to know that there are some.

use std::collections::{HashMap, HashSet};

use crate::alloc::{Allocator, Run};
use crate::error::{FsError, Result};
use crate::extent_map::ExtentMap;
use crate::format::Superblock;
use crate::state::{Freed, Inode, State};
use crate::store::Snapshot;
use crate::types::{Ino, MAX_FILE_SIZE};

fn corrupt(what: String) -> FsError {
    FsError::Corrupt {
        what: format!("{what}; run `nearfs fsck` for details"),
    }
}

pub(crate) fn build_state(sb: &Superblock, snap: Snapshot) -> Result<State> {
    let mut alloc = Allocator::new(sb.data_start, sb.data_blocks);
    let mut inodes = HashMap::with_capacity(snap.inodes.len());
    for (ino, rec) in snap.inodes {
        let extents = ExtentMap::from_extents(&rec.extents)
            .ok_or_else(|| corrupt(format!("inode {ino} has overlapping extents")))?;
        for e in &rec.extents {
            if !sb.in_data_region(e.dev, e.len) {
                return Err(corrupt(format!(
                    "inode {ino} has an extent outside the data region"
                )));
            }
            alloc
                .claim(Run {
                    start: e.dev,
                    len: e.len,
                })
                .map_err(|_| corrupt(format!("inode {ino} shares blocks with another inode")))?;
        }
        if rec.attrs.size > MAX_FILE_SIZE {
            return Err(corrupt(format!("inode {ino} is larger than a file can be")));
        }
        if ino >= snap.next_ino {
            return Err(corrupt(format!("inode {ino} is beyond the inode counter")));
        }
        inodes.insert(ino, Inode::from_record(rec, extents));
    }
    if !inodes.get(&Ino::ROOT.0).is_some_and(Inode::is_dir) {
        return Err(corrupt("the root directory is missing".into()));
    }
    let mut seen = HashSet::new();
    for (dir, name, child, cookie) in snap.dirents {
        if !inodes.contains_key(&child) {
            return Err(corrupt(format!(
                "directory {dir} names missing inode {child}"
            )));
        }
        if !seen.insert((dir, cookie)) {
            return Err(corrupt(format!("directory {dir} repeats a readdir cookie")));
        }
        let d = inodes
            .get_mut(&dir)
            .and_then(|i| i.dir.as_mut())
            .ok_or_else(|| corrupt(format!("entry in {dir}, which is not a directory")))?;
        d.entries.insert(name.clone(), (child, cookie));
        d.order.insert(cookie, name);
        d.next_cookie = d.next_cookie.max(cookie + 1);
    }
    Ok(State {
        inodes,
        alloc,
        next_ino: snap.next_ino,
        next_generation: snap.next_generation,
        dirty_inodes: HashSet::new(),
        dirty_dirents: HashSet::new(),
        pending_free: Freed::default(),
    })
}
