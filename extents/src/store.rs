//! The redb tables that hold metadata, and moving records between them and memory.
//!
//! ```text
//! inodes  : u64 ino             -> InodeRecord bytes (format.rs)
//! dirents : (u64 dir, &[u8] name) -> (u64 child ino, u64 readdir cookie)
//! meta    : &str                -> u64   ("next_ino", "next_generation")
//! ```

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{FsError, Result};
use crate::format::InodeRecord;

pub const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
pub const DIRENTS: TableDefinition<(u64, &[u8]), (u64, u64)> = TableDefinition::new("dirents");
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub const NEXT_INO: &str = "next_ino";
pub const NEXT_GENERATION: &str = "next_generation";

/// Everything committed, as read back from the store.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub inodes: Vec<(u64, InodeRecord)>,
    pub dirents: Vec<(u64, Vec<u8>, u64, u64)>,
    pub next_ino: u64,
    pub next_generation: u64,
}

/// A directory entry's key (directory, name) and value (child, readdir cookie).
pub type DirentKey = (u64, Vec<u8>);
pub type DirentValue = (u64, u64);

/// Changes to write in one transaction. `None` deletes.
#[derive(Debug, Default)]
pub struct Batch {
    pub inodes: Vec<(u64, Option<Vec<u8>>)>,
    pub dirents: Vec<(DirentKey, Option<DirentValue>)>,
    pub next_ino: u64,
    pub next_generation: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty() && self.dirents.is_empty()
    }
}

/// Creates the tables in a fresh database.
pub fn init(db: &redb::Database, root: &InodeRecord) -> Result<()> {
    let txn = db.begin_write()?;
    {
        let mut inodes = txn.open_table(INODES)?;
        inodes.insert(crate::types::Ino::ROOT.0, root.encode().as_slice())?;
        txn.open_table(DIRENTS)?;
        let mut meta = txn.open_table(META)?;
        meta.insert(NEXT_INO, 2)?;
        meta.insert(NEXT_GENERATION, 1)?;
    }
    txn.commit()?;
    Ok(())
}

/// Reads every committed record.
pub fn load(db: &impl ReadableDatabase) -> Result<Snapshot> {
    let txn = db.begin_read()?;
    let mut snap = Snapshot::default();
    let inodes = txn.open_table(INODES)?;
    for row in inodes.iter()? {
        let (k, v) = row?;
        let ino = k.value();
        let rec = InodeRecord::decode(v.value()).map_err(|_| FsError::Corrupt {
            what: format!("inode {ino}: record is truncated"),
        })?;
        snap.inodes.push((ino, rec));
    }
    let dirents = txn.open_table(DIRENTS)?;
    for row in dirents.iter()? {
        let (k, v) = row?;
        let (dir, name) = k.value();
        let (child, cookie) = v.value();
        snap.dirents.push((dir, name.to_vec(), child, cookie));
    }
    let meta = txn.open_table(META)?;
    let get = |key: &str| -> Result<u64> {
        meta.get(key)?
            .map(|v| v.value())
            .ok_or_else(|| FsError::Corrupt {
                what: format!("metadata key {key:?} is missing"),
            })
    };
    snap.next_ino = get(NEXT_INO)?;
    snap.next_generation = get(NEXT_GENERATION)?;
    Ok(snap)
}

/// Writes a batch in one durable transaction.
pub fn apply(db: &redb::Database, batch: &Batch) -> Result<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)
        .map_err(|e| FsError::Store(e.to_string()))?;
    {
        let mut inodes = txn.open_table(INODES)?;
        for (ino, rec) in &batch.inodes {
            match rec {
                Some(bytes) => inodes.insert(*ino, bytes.as_slice())?,
                None => inodes.remove(*ino)?,
            };
        }
        let mut dirents = txn.open_table(DIRENTS)?;
        for ((dir, name), val) in &batch.dirents {
            match val {
                Some(v) => dirents.insert((*dir, name.as_slice()), *v)?,
                None => dirents.remove((*dir, name.as_slice()))?,
            };
        }
        let mut meta = txn.open_table(META)?;
        meta.insert(NEXT_INO, batch.next_ino)?;
        meta.insert(NEXT_GENERATION, batch.next_generation)?;
    }
    txn.commit()?;
    Ok(())
}
