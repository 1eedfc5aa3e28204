//! The metadata region: a redb database living on a reserved range of the device (the
//! BlueStore pattern — metadata in a transactional store, file data in raw extents).
//!
//! redb sees a growable "file". The region's first block holds two 512-byte header slots
//! recording that file's logical length; a length change writes the slot not holding the
//! newest copy, with a higher sequence number, so a torn header write leaves the other
//! slot intact. redb then starts at the region's second block.

use std::io;
use std::sync::{Arc, Mutex};

use blockdev::BlockDevice;

use crate::codec::{get_u32, get_u64, put_u32, put_u64};
use crate::types::BLOCK_SIZE;

const SLOT_BYTES: usize = 512;
const SLOT_MAGIC: [u8; 8] = *b"NFSMETA1";
mod slot {
    pub const MAGIC: usize = 0;
    pub const SEQ: usize = 8;
    pub const LEN: usize = 16;
    /// CRC-32 of bytes [0, CHECKSUM).
    pub const CHECKSUM: usize = 24;
}

/// The part of the device redb stores its database in.
#[derive(Debug)]
pub struct MetaRegion {
    dev: Arc<dyn BlockDevice>,
    /// Byte offset of the header block.
    start: u64,
    /// Bytes available to redb.
    capacity: u64,
    state: Arc<Mutex<Header>>,
}

/// A view of how much of the region redb uses, valid after the region moved into redb.
#[derive(Clone, Debug)]
pub struct MetaUsage {
    state: Arc<Mutex<Header>>,
    capacity: u64,
}

impl MetaUsage {
    /// Bytes redb currently uses.
    pub fn used(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).len
    }

    /// Bytes available to redb.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

#[derive(Clone, Copy, Debug)]
struct Header {
    seq: u64,
    len: u64,
}

fn encode_slot(h: Header) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[..8].copy_from_slice(&SLOT_MAGIC);
    put_u64(&mut b, slot::SEQ, h.seq);
    put_u64(&mut b, slot::LEN, h.len);
    let crc = crc32fast::hash(&b[..slot::CHECKSUM]);
    put_u32(&mut b, slot::CHECKSUM, crc);
    b
}

fn decode_slot(b: &[u8]) -> Option<Header> {
    let valid = b[slot::MAGIC..slot::MAGIC + 8] == SLOT_MAGIC
        && get_u32(b, slot::CHECKSUM) == crc32fast::hash(&b[..slot::CHECKSUM]);
    valid.then(|| Header {
        seq: get_u64(b, slot::SEQ),
        len: get_u64(b, slot::LEN),
    })
}

fn out_of_space() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl MetaRegion {
    /// Writes an empty header into the region starting at block `start` of `blocks` blocks,
    /// reporting `(bytes done, bytes total)` of the zeroing to `progress`.
    pub fn format(
        dev: &Arc<dyn BlockDevice>,
        start: u64,
        blocks: u64,
        progress: Option<fn(u64, u64)>,
    ) -> io::Result<()> {
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        block[..SLOT_BYTES].copy_from_slice(&encode_slot(Header { seq: 1, len: 0 }));
        dev.write_at(&block, start * BLOCK_SIZE)?;
        // redb requires that space it grows into reads as zeros; make sure stale bytes of
        // an earlier filesystem do not survive in the region.
        const CHUNK: u64 = 64 << 20;
        let (first, total) = ((start + 1) * BLOCK_SIZE, (blocks - 1) * BLOCK_SIZE);
        let mut done = 0;
        while done < total {
            let n = CHUNK.min(total - done);
            dev.write_zeroes(first + done, n)?;
            done += n;
            if let Some(report) = progress {
                report(done, total);
            }
        }
        Ok(())
    }

    /// Opens the region starting at block `start` of `blocks` blocks.
    pub fn open(dev: Arc<dyn BlockDevice>, start: u64, blocks: u64) -> io::Result<Self> {
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        dev.read_at(&mut block, start * BLOCK_SIZE)?;
        let capacity = (blocks - 1) * BLOCK_SIZE;
        let header = [&block[..SLOT_BYTES], &block[SLOT_BYTES..2 * SLOT_BYTES]]
            .into_iter()
            .filter_map(decode_slot)
            .max_by_key(|h| h.seq)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "metadata region header is damaged",
                )
            })?;
        if header.len > capacity {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "metadata region header claims more than the region holds",
            ));
        }
        Ok(Self {
            dev,
            start: start * BLOCK_SIZE,
            capacity,
            state: Arc::new(Mutex::new(header)),
        })
    }

    /// Bytes redb currently uses.
    pub fn used(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).len
    }

    /// A handle that reports usage after the region was handed to redb.
    pub fn usage(&self) -> MetaUsage {
        MetaUsage {
            state: self.state.clone(),
            capacity: self.capacity,
        }
    }

    fn data_offset(&self, offset: u64, len: usize, limit: u64) -> io::Result<u64> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= limit => Ok(self.start + BLOCK_SIZE + offset),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("metadata access [{offset}, +{len}) past its length {limit}"),
            )),
        }
    }
}

impl redb::StorageBackend for MetaRegion {
    fn len(&self) -> io::Result<u64> {
        Ok(self.used())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let at = self.data_offset(offset, out.len(), self.used())?;
        self.dev.read_at(out, at)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.capacity {
            return Err(out_of_space());
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if len > state.len {
            self.dev
                .write_zeroes(self.start + BLOCK_SIZE + state.len, len - state.len)?;
        }
        let next = Header {
            seq: state.seq + 1,
            len,
        };
        let slot_off = if next.seq.is_multiple_of(2) {
            SLOT_BYTES as u64
        } else {
            0
        };
        self.dev
            .write_at(&encode_slot(next), self.start + slot_off)?;
        *state = next;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.dev.flush()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let at = self.data_offset(offset, data.len(), self.used())?;
        self.dev.write_at(data, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::MemDevice;
    use redb::StorageBackend;

    #[test]
    fn length_survives_reopen_and_growth_is_bounded() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 * BLOCK_SIZE));
        MetaRegion::format(&dev, 1, 8, None).unwrap();
        let r = MetaRegion::open(dev.clone(), 1, 8).unwrap();
        assert_eq!(r.len().unwrap(), 0);
        r.set_len(4096).unwrap();
        r.write(10, b"abc").unwrap();
        r.set_len(8192).unwrap();
        assert!(r.set_len(8 * BLOCK_SIZE).is_err(), "grew past the region");
        assert!(r.write(8190, b"abc").is_err());
        let r = MetaRegion::open(dev.clone(), 1, 8).unwrap();
        assert_eq!(r.len().unwrap(), 8192);
        let mut buf = [0u8; 3];
        r.read(10, &mut buf).unwrap();
        assert_eq!(&buf, b"abc");
    }

    #[test]
    fn a_damaged_slot_falls_back_to_the_other() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 * BLOCK_SIZE));
        MetaRegion::format(&dev, 1, 8, None).unwrap();
        let r = MetaRegion::open(dev.clone(), 1, 8).unwrap();
        r.set_len(4096).unwrap(); // seq 2, second slot
        dev.write_at(&[0xff; 8], BLOCK_SIZE + SLOT_BYTES as u64 + 16)
            .unwrap();
        let r = MetaRegion::open(dev.clone(), 1, 8).unwrap();
        assert_eq!(r.len().unwrap(), 0, "the older, intact slot wins");
        dev.write_at(&[0xff; 8], BLOCK_SIZE).unwrap();
        assert!(MetaRegion::open(dev, 1, 8).is_err());
    }
}
