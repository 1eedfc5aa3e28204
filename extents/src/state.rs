//! The filesystem in memory: inodes, directories, the allocator, and what changed since
//! the last commit.
//!
//! Two kinds of lock guard it (`Fs` holds them):
//! - the table lock over [`State`]: every change to metadata is made under it in one
//!   piece, so a commit, which takes its batch under the same lock, always captures a
//!   consistent cut. It is never held across device I/O, and nothing waits for another
//!   lock while holding it;
//! - one [`IoLock`] per inode, held across device I/O on the file's blocks: shared by
//!   reads and reading runs, exclusive by whatever writes the file's blocks or changes its
//!   extent map or size (writes, truncation, fallocate, writing runs). While it is held
//!   shared, the blocks being read cannot change owner; while held exclusive, the file's
//!   map and size are the holder's to change.
//!
//! Lock order: an inode's `IoLock`, then the table lock. At most one `IoLock` is held at a
//! time, so operations on different files never wait for each other's device I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::alloc::{Allocator, Run};
use crate::error::{FsError, Result};
use crate::extent_map::ExtentMap;
use crate::format::{InodeAttrs, InodeRecord, S_IFDIR, S_IFMT};
use crate::store::Batch;
use crate::types::{FileBlock, Ino};

/// A file's I/O lock (see the module comment). It guards no data of its own, so a panic
/// while it is held leaves nothing half-done behind it.
pub(crate) type IoLock = RwLock<()>;

/// A directory's entries in memory.
#[derive(Clone, Debug, Default)]
pub(crate) struct Dir {
    /// name -> (child, readdir cookie)
    pub entries: BTreeMap<Vec<u8>, (u64, u64)>,
    /// cookie -> name; readdir walks this, so entries added or removed during a listing
    /// never make it skip or repeat the others.
    pub order: BTreeMap<u64, Vec<u8>>,
    pub next_cookie: u64,
}

/// First cookie of a real entry; 0 and 1 are "." and "..".
pub(crate) const FIRST_COOKIE: u64 = 2;

impl Dir {
    pub fn new() -> Self {
        Self {
            next_cookie: FIRST_COOKIE,
            ..Self::default()
        }
    }

    pub fn insert(&mut self, name: Vec<u8>, child: u64) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.order.insert(cookie, name.clone());
        self.entries.insert(name, (child, cookie));
        cookie
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<u64> {
        let (child, cookie) = self.entries.remove(name)?;
        self.order.remove(&cookie);
        Some(child)
    }
}

/// One inode in memory: its stored attributes (reached through `Deref`, as `i.mode`),
/// and what the attributes do not say.
#[derive(Debug)]
pub(crate) struct Inode {
    pub attrs: InodeAttrs,
    pub extents: ExtentMap,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub target: Vec<u8>,
    pub dir: Option<Dir>,
    /// Open handles (not persisted).
    pub open: u32,
    /// Kernel lookup references (not persisted). Atomic so lookups can count them under
    /// the shared table lock.
    pub refs: AtomicU64,
    pub io: Arc<IoLock>,
}

impl Deref for Inode {
    type Target = InodeAttrs;
    fn deref(&self) -> &InodeAttrs {
        &self.attrs
    }
}

impl DerefMut for Inode {
    fn deref_mut(&mut self) -> &mut InodeAttrs {
        &mut self.attrs
    }
}

impl Inode {
    /// A new inode with no data.
    pub fn new(attrs: InodeAttrs, target: Vec<u8>) -> Self {
        Self::from_record(
            InodeRecord {
                attrs,
                extents: Vec::new(),
                xattrs: Vec::new(),
                target,
            },
            ExtentMap::default(),
        )
    }

    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }

    pub fn owner(&self) -> crate::access::Owner {
        crate::access::Owner {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
        }
    }

    pub fn record(&self) -> InodeRecord {
        InodeRecord {
            attrs: self.attrs,
            extents: self.extents.extents(),
            xattrs: self
                .xattrs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            target: self.target.clone(),
        }
    }

    /// The inode a stored record describes, with its extents already mapped.
    pub fn from_record(rec: InodeRecord, extents: ExtentMap) -> Self {
        Self {
            dir: (rec.attrs.mode & S_IFMT == S_IFDIR).then(Dir::new),
            attrs: rec.attrs,
            extents,
            xattrs: rec.xattrs.into_iter().collect(),
            target: rec.target,
            open: 0,
            refs: AtomicU64::new(0),
            io: Arc::default(),
        }
    }
}

/// A committed batch's companions: what it freed, released once the batch is durable.
#[derive(Debug, Default)]
pub(crate) struct Freed {
    pub runs: Vec<Run>,
    /// I/O locks of the inodes the runs came from when they were removed without it
    /// (deleted files): their blocks may be in a read or run still going, so they are
    /// released only once each of these can be taken exclusively.
    pub retired: Vec<Arc<IoLock>>,
}

impl Freed {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn blocks(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }

    fn extend(&mut self, other: Freed) {
        self.runs.extend(other.runs);
        self.retired.extend(other.retired);
    }
}

/// Mutable state of a mounted filesystem (under the table lock).
#[derive(Debug)]
pub(crate) struct State {
    pub inodes: HashMap<u64, Inode>,
    pub alloc: Allocator,
    pub next_ino: u64,
    pub next_generation: u64,
    /// Inodes whose record changed (or that were deleted) since the last commit.
    pub dirty_inodes: HashSet<u64>,
    /// Directory entries that changed (or were removed) since the last commit.
    pub dirty_dirents: HashSet<(u64, Vec<u8>)>,
    /// Blocks freed since the last batch was taken; reusable once a commit is durable.
    pub pending_free: Freed,
}

impl State {
    pub fn get(&self, ino: Ino) -> Result<&Inode> {
        self.inodes.get(&ino.0).ok_or(FsError::NotFound)
    }

    pub fn get_mut(&mut self, ino: Ino) -> Result<&mut Inode> {
        self.dirty_inodes.insert(ino.0);
        self.inodes.get_mut(&ino.0).ok_or(FsError::NotFound)
    }

    /// A file's I/O lock, to take before the table lock (see the module comment).
    pub fn io(&self, ino: Ino) -> Result<Arc<IoLock>> {
        Ok(self.get(ino)?.io.clone())
    }

    /// The inode `name` names in directory `parent`.
    pub fn child(&self, parent: Ino, name: &[u8]) -> Result<Ino> {
        let dir = self.get(parent)?.dir.as_ref().ok_or(FsError::NotDir)?;
        dir.entries
            .get(name)
            .map(|e| Ino(e.0))
            .ok_or(FsError::NotFound)
    }

    /// Adds `name -> child` to directory `parent`.
    pub fn add_entry(&mut self, parent: Ino, name: &[u8], child: Ino) -> Result<()> {
        let dir = self.get_mut(parent)?.dir.as_mut().ok_or(FsError::NotDir)?;
        dir.insert(name.to_vec(), child.0);
        self.dirty_dirents.insert((parent.0, name.to_vec()));
        Ok(())
    }

    /// Removes `name` from directory `parent`, returning the child it named.
    pub fn remove_entry(&mut self, parent: Ino, name: &[u8]) -> Result<Ino> {
        let dir = self.get_mut(parent)?.dir.as_mut().ok_or(FsError::NotDir)?;
        let child = dir.remove(name).ok_or(FsError::NotFound)?;
        self.dirty_dirents.insert((parent.0, name.to_vec()));
        Ok(Ino(child))
    }

    /// Frees an inode once nothing refers to it: no links, no open handle, no kernel
    /// reference. Its I/O lock is not taken (that would wait under the table lock); the
    /// commit that releases its blocks waits for it instead.
    pub fn reap(&mut self, ino: Ino) {
        let Some(i) = self.inodes.get(&ino.0) else {
            return;
        };
        if i.nlink > 0 || i.open > 0 || i.refs.load(Ordering::Relaxed) > 0 || ino == Ino::ROOT {
            return;
        }
        let mut i = self.inodes.remove(&ino.0).expect("checked above");
        let runs = i.extents.remove(FileBlock(0), u64::MAX);
        if !runs.is_empty() {
            self.pending_free.runs.extend(runs);
            self.pending_free.retired.push(i.io);
        }
        self.dirty_inodes.insert(ino.0);
    }

    /// Takes everything changed since the last batch, and what was freed before it.
    pub fn take_batch(&mut self) -> (Batch, Freed) {
        let inodes = self
            .dirty_inodes
            .drain()
            .map(|ino| (ino, self.inodes.get(&ino).map(|i| i.record().encode())))
            .collect();
        let dirents = self
            .dirty_dirents
            .drain()
            .map(|(dir, name)| {
                let val = self
                    .inodes
                    .get(&dir)
                    .and_then(|d| d.dir.as_ref())
                    .and_then(|d| d.entries.get(&name).copied());
                ((dir, name), val)
            })
            .collect();
        let batch = Batch {
            inodes,
            dirents,
            next_ino: self.next_ino,
            next_generation: self.next_generation,
        };
        (batch, std::mem::take(&mut self.pending_free))
    }

    /// Puts a batch that failed to commit back, so that the next commit retries it.
    pub fn restore_batch(&mut self, batch: Batch, freed: Freed) {
        self.dirty_inodes
            .extend(batch.inodes.into_iter().map(|(ino, _)| ino));
        self.dirty_dirents
            .extend(batch.dirents.into_iter().map(|(k, _)| k));
        self.pending_free.extend(freed);
    }
}
