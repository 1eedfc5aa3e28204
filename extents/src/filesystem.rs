//! The filesystem: in-memory state over the committed store, and how the two meet.
//!
//! All metadata is held in memory (loaded at mount) and changes there first; a commit
//! writes every changed record to the store in one durable transaction. The order that
//! makes crashes safe:
//!
//! 1. file data goes straight to its extents on the device;
//! 2. a commit takes a consistent batch of changed records under the table lock,
//!    flushes the device (so every data block the batch references is durable), then
//!    commits the batch;
//! 3. blocks freed before the batch was taken return to the allocator only after the
//!    batch is durable — until then the committed metadata may still point at them, and
//!    reusing them could show one file's bytes through another after a crash — and after
//!    every read or run that may still be reading them has ended (`state::Freed`).
//!
//! A crash therefore leaves exactly the last committed state, whose data blocks all
//! hold what was written to them before that commit. An operation that panics while
//! changing the table poisons its lock; from then on nothing is changed or committed
//! ([`FsError::Halted`]), so its half-done change never reaches the device.
//!
//! Locking is described in `state.rs`.

use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use blockdev::BlockDevice;

use crate::error::{FsError, Result};
use crate::format::{FORMAT_VERSION, InodeRecord, Superblock, Timestamp};
use crate::meta::{MetaRegion, MetaUsage};
use crate::state::State;
use crate::store;
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

/// A mounted nearfs filesystem. All operations take `&self` and may run concurrently.
#[derive(Debug)]
pub struct Fs {
    pub(crate) dev: Arc<dyn BlockDevice>,
    pub(crate) sb: Superblock,
    /// None when mounted read-only.
    db: Option<redb::Database>,
    /// The table lock (`state.rs`).
    state: RwLock<State>,
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
        let orphans: Vec<u64> = fs
            .table()
            .inodes
            .iter()
            .filter(|(_, i)| i.nlink == 0)
            .map(|(&ino, _)| ino)
            .collect();
        if !orphans.is_empty() && !opts.read_only {
            tracing::info!(count = orphans.len(), "removing orphaned inodes");
            let mut st = fs.table_mut()?;
            for ino in orphans {
                st.reap(Ino(ino));
            }
            drop(st);
            fs.commit()?;
        }
        Ok(fs)
    }

    /// The table, to read. Reading through a poisoned lock is safe (nothing read is
    /// committed), and lets a halted filesystem still be inspected.
    pub(crate) fn table(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The table, to change; refused once an operation panicked while changing it.
    pub(crate) fn table_mut(&self) -> Result<RwLockWriteGuard<'_, State>> {
        self.state.write().map_err(|_| FsError::Halted)
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
        let st = self.table();
        !st.dirty_inodes.is_empty() || !st.dirty_dirents.is_empty() || !st.pending_free.is_empty()
    }

    /// Makes every change so far durable (see the module comment for the ordering).
    pub fn commit(&self) -> Result<()> {
        let Some(db) = &self.db else { return Ok(()) };
        let _one_at_a_time = lock(&self.commit_lock);
        let (batch, freed) = self.table_mut()?.take_batch();
        if batch.is_empty() && freed.is_empty() {
            return self.dev.flush().map_err(FsError::from);
        }
        let result = self
            .dev
            .flush()
            .map_err(FsError::from)
            .and_then(|()| store::apply(db, &batch));
        if result.is_ok() {
            // Reads and runs of deleted files that may still be reading their blocks.
            for io in &freed.retired {
                drop(io.write().unwrap_or_else(|e| e.into_inner()));
            }
        }
        let Ok(mut st) = self.table_mut() else {
            // Halted while the batch was out: keep the freed blocks out of use.
            return result.and(Err(FsError::Halted));
        };
        match result {
            Ok(()) => {
                for run in freed.runs {
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
            Err(FsError::NoSpace) if !self.table().pending_free.is_empty() => {
                self.commit()?;
                op()
            }
            other => other,
        }
    }

    /// Facts about the filesystem, for `nearfs info` and the root's xattr view.
    pub fn info(&self) -> FsInfo {
        let st = self.table();
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
            pending_free_blocks: st.pending_free.blocks(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Creds;
    use blockdev::MemDevice;

    /// An operation that panics halfway through a change leaves the table poisoned: the
    /// change is never committed, later changes are refused, and reads still work.
    #[test]
    fn a_panic_midway_through_a_change_is_never_committed() {
        let mem = Arc::new(MemDevice::new(64 << 20));
        Fs::mkfs(mem.clone(), MkfsOptions::default()).unwrap();
        let fs = Arc::new(Fs::mount(mem.clone(), MountOptions::default()).unwrap());
        let cr = Creds::root();
        let kept = fs.create(&cr, Ino::ROOT, b"kept", 0o644).unwrap().ino;
        fs.write(&cr, kept, 0, b"committed").unwrap();
        fs.commit().unwrap();
        let half = fs.clone();
        let panicked = std::thread::spawn(move || {
            let mut st = half.table_mut().unwrap();
            // Half of an unlink: the entry is gone, the link count not yet dropped.
            st.remove_entry(Ino::ROOT, b"kept").unwrap();
            panic!("an operation fails midway");
        })
        .join();
        assert!(panicked.is_err());
        assert!(matches!(fs.commit(), Err(FsError::Halted)));
        assert!(matches!(
            fs.write(&cr, kept, 0, b"more"),
            Err(FsError::Halted)
        ));
        assert!(matches!(
            fs.create(&cr, Ino::ROOT, b"new", 0o644),
            Err(FsError::Halted)
        ));
        assert_eq!(fs.read(kept, 0, 64).unwrap(), b"committed");
        drop(fs);
        let again = Fs::mount(mem, MountOptions::default()).unwrap();
        let ino = again.lookup(&cr, Ino::ROOT, b"kept").unwrap().ino;
        assert_eq!(again.read(ino, 0, 64).unwrap(), b"committed");
    }
}
