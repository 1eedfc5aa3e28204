//! The filesystem: in-memory state over the committed store, and how the two meet.
//!
//! All metadata is held in memory (loaded at mount) and changes there first; a commit
//! writes every changed record to the store in one durable transaction. The order that
//! makes crashes safe:
//!
//! 1. file data goes straight to its extents on the device;
//! 2. a commit takes a consistent batch of changed records under the state lock,
//!    flushes the device (so every data block the batch references is durable), then
//!    commits the batch;
//! 3. blocks freed before the batch was taken return to the allocator only after the
//!    batch is durable — until then the committed metadata may still point at them, and
//!    reusing them could show one file's bytes through another after a crash.
//!
//! A crash therefore leaves exactly the last committed state, whose data blocks all
//! hold what was written to them before that commit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use blockdev::BlockDevice;

use crate::alloc::{Allocator, Run};
use crate::error::{FsError, Result};
use crate::extent_map::ExtentMap;
use crate::format::{FORMAT_VERSION, InodeRecord, S_IFDIR, S_IFMT, Superblock, Timestamp};
use crate::meta::{MetaRegion, MetaUsage};
use crate::store::{self, Batch};
use crate::types::{BLOCK_SIZE, Ino};

/// Options for opening (mounting) a filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct MountOptions {
    /// Refuse every change.
    pub read_only: bool,
    /// Keep inodes alive while the kernel holds references to them (FUSE lookup counts),
    /// not only while they are linked or open.
    pub kernel_refs: bool,
}

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

/// One inode in memory.
#[derive(Debug)]
pub(crate) struct Inode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    pub rdev: u32,
    pub generation: u64,
    pub parent: u64,
    pub extents: ExtentMap,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub target: Vec<u8>,
    pub dir: Option<Dir>,
    /// Open handles (not persisted).
    pub open: u32,
    /// Kernel lookup references (not persisted). Atomic so lookups can count them under
    /// the shared lock.
    pub refs: AtomicU64,
}

impl Inode {
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
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.crtime,
            rdev: self.rdev,
            generation: self.generation,
            parent: self.parent,
            extents: self.extents.extents(),
            xattrs: self
                .xattrs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            target: self.target.clone(),
        }
    }

    pub fn from_record(rec: InodeRecord, extents: ExtentMap) -> Self {
        let dir = (rec.mode & S_IFMT == S_IFDIR).then(Dir::new);
        Self {
            mode: rec.mode,
            uid: rec.uid,
            gid: rec.gid,
            nlink: rec.nlink,
            size: rec.size,
            atime: rec.atime,
            mtime: rec.mtime,
            ctime: rec.ctime,
            crtime: rec.crtime,
            rdev: rec.rdev,
            generation: rec.generation,
            parent: rec.parent,
            extents,
            xattrs: rec.xattrs.into_iter().collect(),
            target: rec.target,
            dir,
            open: 0,
            refs: AtomicU64::new(0),
        }
    }
}

/// Mutable state of a mounted filesystem.
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
    pub pending_free: Vec<Run>,
}

impl State {
    pub fn get(&self, ino: Ino) -> Result<&Inode> {
        self.inodes.get(&ino.0).ok_or(FsError::NotFound)
    }

    pub fn get_mut(&mut self, ino: Ino) -> Result<&mut Inode> {
        self.dirty_inodes.insert(ino.0);
        self.inodes.get_mut(&ino.0).ok_or(FsError::NotFound)
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
    /// reference.
    pub fn reap(&mut self, ino: Ino) {
        let Some(i) = self.inodes.get(&ino.0) else {
            return;
        };
        if i.nlink > 0 || i.open > 0 || i.refs.load(Ordering::Relaxed) > 0 || ino == Ino::ROOT {
            return;
        }
        let mut i = self.inodes.remove(&ino.0).expect("checked above");
        self.pending_free
            .extend(i.extents.remove(crate::types::FileBlock(0), u64::MAX));
        self.dirty_inodes.insert(ino.0);
    }

    fn take_batch(&mut self) -> (Batch, Vec<Run>) {
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
    fn restore_batch(&mut self, batch: Batch, freed: Vec<Run>) {
        self.dirty_inodes
            .extend(batch.inodes.into_iter().map(|(ino, _)| ino));
        self.dirty_dirents
            .extend(batch.dirents.into_iter().map(|(k, _)| k));
        self.pending_free.extend(freed);
    }
}

/// A mounted nearfs filesystem. All operations take `&self` and may run concurrently.
#[derive(Debug)]
pub struct Fs {
    pub(crate) dev: Arc<dyn BlockDevice>,
    pub(crate) sb: Superblock,
    /// None when mounted read-only.
    db: Option<redb::Database>,
    pub(crate) state: RwLock<State>,
    commit_lock: Mutex<()>,
    pub(crate) opts: MountOptions,
    meta_usage: MetaUsage,
}

/// Options for mkfs.
#[derive(Clone, Copy, Debug, Default)]
pub struct MkfsOptions {
    /// Format even if the device already holds a nearfs filesystem.
    pub force: bool,
    /// Owner of the root directory.
    pub root_uid: u32,
    pub root_gid: u32,
    /// Called with (bytes done, bytes total) while the metadata region is zeroed.
    pub progress: Option<fn(u64, u64)>,
}

fn random_uuid() -> [u8; 16] {
    let mut uuid = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut uuid))
        .is_err()
    {
        let t = Timestamp::now();
        uuid[..8].copy_from_slice(&t.secs.to_le_bytes());
        uuid[8..12].copy_from_slice(&t.nanos.to_le_bytes());
        uuid[12..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
    uuid
}

pub(crate) fn lock_read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn lock_write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a redb open, turning a panic inside redb on hostile bytes into a corruption report
/// and redb's "not a database" into one too.
fn guarded<T>(open: impl FnOnce() -> std::result::Result<T, redb::DatabaseError>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            Err(FsError::Corrupt {
                what: format!("metadata region: {e}"),
            })
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(FsError::Corrupt {
            what: "metadata region is unreadable".into(),
        }),
    }
}

fn builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(16 << 20);
    b
}

/// Opens (or, with `create`, initialises) redb on the metadata region for writing. redb's
/// integrity check runs at every open, so a damaged region is reported rather than
/// trusted; it may complete a commit a crash interrupted.
pub(crate) fn open_db(region: MetaRegion, create: bool) -> Result<redb::Database> {
    guarded(move || {
        let mut b = builder();
        b.set_check_integrity_on_open(!create);
        b.create_with_backend(region)
    })
}

/// Reads the committed metadata without writing anything; a store that needs recovery
/// after a crash is refused.
fn load_read_only(region: MetaRegion) -> Result<store::Snapshot> {
    let db = guarded(move || builder().open_read_only_with_backend(region)).map_err(|e| match e {
        FsError::Store(why) => FsError::Store(format!(
            "{why} (a read-only open cannot recover a store after a crash: mount read-write once)"
        )),
        other => other,
    })?;
    store::load(&db)
}

/// Reads and validates the superblock.
pub fn read_superblock(dev: &dyn BlockDevice) -> Result<Superblock> {
    if dev.len() < BLOCK_SIZE {
        return Err(FsError::Corrupt {
            what: "device is smaller than one block".into(),
        });
    }
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    dev.read_at(&mut block, 0)?;
    Superblock::decode(&block, dev.len())
}

impl Fs {
    /// Formats `dev` as an empty nearfs filesystem.
    pub fn mkfs(dev: Arc<dyn BlockDevice>, opts: MkfsOptions) -> Result<Superblock> {
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        if dev.len() >= BLOCK_SIZE {
            dev.read_at(&mut block, 0)?;
            if Superblock::has_magic(&block) && !opts.force {
                return Err(FsError::Exists);
            }
        }
        let now = Timestamp::now();
        let sb = Superblock::layout(dev.len(), random_uuid(), now.secs.max(0) as u64)?;
        // Invalidate any old superblock first, so an interrupted mkfs leaves no filesystem
        // rather than a half-formatted one.
        dev.write_at(&vec![0u8; BLOCK_SIZE as usize], 0)?;
        MetaRegion::format(&dev, sb.meta_start.0, sb.meta_blocks, opts.progress)?;
        let region = MetaRegion::open(dev.clone(), sb.meta_start.0, sb.meta_blocks)?;
        let db = open_db(region, true)?;
        let root = InodeRecord::empty_dir(0o755, opts.root_uid, opts.root_gid, Ino::ROOT.0, 0, now);
        store::init(&db, &root)?;
        drop(db);
        dev.flush()?;
        dev.write_at(&sb.encode(), 0)?;
        dev.flush()?;
        Ok(sb)
    }

    /// Mounts the filesystem on `dev`: validates the superblock and the store, loads all
    /// metadata, rebuilds free space from the extents and removes orphans (inodes that
    /// were unlinked while open when the filesystem last stopped).
    pub fn mount(dev: Arc<dyn BlockDevice>, opts: MountOptions) -> Result<Self> {
        let sb = read_superblock(dev.as_ref())?;
        let region =
            MetaRegion::open(dev.clone(), sb.meta_start.0, sb.meta_blocks).map_err(|e| {
                FsError::Corrupt {
                    what: format!("metadata region: {e}"),
                }
            })?;
        let meta_usage = region.usage();
        let (db, snap) = if opts.read_only {
            (None, load_read_only(region)?)
        } else {
            let db = open_db(region, false)?;
            let snap = store::load(&db)?;
            (Some(db), snap)
        };
        let state = crate::load::build_state(&sb, snap)?;
        let fs = Self {
            dev: dev.clone(),
            sb,
            db,
            state: RwLock::new(state),
            commit_lock: Mutex::new(()),
            opts,
            meta_usage,
        };
        let orphans: Vec<u64> = lock_read(&fs.state)
            .inodes
            .iter()
            .filter(|(_, i)| i.nlink == 0)
            .map(|(&ino, _)| ino)
            .collect();
        if !orphans.is_empty() && !opts.read_only {
            tracing::info!(count = orphans.len(), "removing orphaned inodes");
            let mut st = lock_write(&fs.state);
            for ino in orphans {
                st.reap(Ino(ino));
            }
            drop(st);
            fs.commit()?;
        }
        Ok(fs)
    }

    /// The superblock this filesystem was mounted with.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The device underneath.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Whether changes are refused.
    pub fn is_read_only(&self) -> bool {
        self.opts.read_only
    }

    /// Whether anything changed since the last commit.
    pub fn is_dirty(&self) -> bool {
        let st = lock_read(&self.state);
        !st.dirty_inodes.is_empty() || !st.dirty_dirents.is_empty() || !st.pending_free.is_empty()
    }

    /// Makes every change so far durable (see the module comment for the ordering).
    pub fn commit(&self) -> Result<()> {
        let Some(db) = &self.db else { return Ok(()) };
        let _one_at_a_time = lock(&self.commit_lock);
        let (batch, freed) = lock_write(&self.state).take_batch();
        if batch.is_empty() && freed.is_empty() {
            return self.dev.flush().map_err(FsError::from);
        }
        let result = self
            .dev
            .flush()
            .map_err(FsError::from)
            .and_then(|()| store::apply(db, &batch));
        let mut st = lock_write(&self.state);
        match result {
            Ok(()) => {
                for run in freed {
                    if let Err(e) = st.alloc.release(run) {
                        tracing::error!(?e, "freed blocks were already free; leaking them");
                    }
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(%e, "commit failed; changes stay pending");
                st.restore_batch(batch, freed);
                Err(e)
            }
        }
    }

    /// Runs `op`; if it ran out of space while freed blocks wait for a commit, commits
    /// and runs it once more.
    pub(crate) fn retry_on_space<T>(&self, op: impl Fn() -> Result<T>) -> Result<T> {
        match op() {
            Err(FsError::NoSpace) if !lock_read(&self.state).pending_free.is_empty() => {
                self.commit()?;
                op()
            }
            other => other,
        }
    }

    /// Facts about the filesystem, for `nearfs info` and the root's xattr view.
    pub fn info(&self) -> FsInfo {
        let st = lock_read(&self.state);
        let files = st
            .inodes
            .values()
            .filter(|i| !i.is_dir() && !i.extents.is_empty());
        let (nfiles, nextents) = files.fold((0u64, 0u64), |(f, e), i| {
            (f + 1, e + i.extents.len() as u64)
        });
        FsInfo {
            format_version: FORMAT_VERSION,
            uuid: self.sb.uuid_string(),
            block_size: BLOCK_SIZE,
            total_blocks: self.sb.total_blocks,
            data_blocks: self.sb.data_blocks,
            free_blocks: st.alloc.free_blocks(),
            pending_free_blocks: st.pending_free.iter().map(|r| r.len).sum(),
            free_runs: st.alloc.free_runs() as u64,
            largest_free_run: st.alloc.largest_run(),
            inodes: st.inodes.len() as u64,
            files_with_data: nfiles,
            extents: nextents,
            meta_bytes_used: self.meta_usage.used(),
            meta_bytes_capacity: self.meta_usage.capacity(),
        }
    }
}

/// Filesystem facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsInfo {
    pub format_version: u32,
    pub uuid: String,
    pub block_size: u64,
    pub total_blocks: u64,
    pub data_blocks: u64,
    pub free_blocks: u64,
    /// Freed blocks waiting for a commit before they can be reused.
    pub pending_free_blocks: u64,
    pub free_runs: u64,
    pub largest_free_run: u64,
    pub inodes: u64,
    pub files_with_data: u64,
    pub extents: u64,
    pub meta_bytes_used: u64,
    pub meta_bytes_capacity: u64,
}

impl FsInfo {
    /// Average extents per file with data (1.0 is ideal).
    pub fn extents_per_file(&self) -> f64 {
        if self.files_with_data == 0 {
            1.0
        } else {
            self.extents as f64 / self.files_with_data as f64
        }
    }

    /// Share of free space outside the largest free run, 0.0 (one run) to 1.0.
    pub fn free_space_fragmentation(&self) -> f64 {
        if self.free_blocks == 0 {
            0.0
        } else {
            1.0 - self.largest_free_run as f64 / self.free_blocks as f64
        }
    }
}
