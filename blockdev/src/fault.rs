//! A device that fails after a set number of I/Os.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::BlockDevice;

/// What happens at the I/O that hits the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// That I/O and every later one fails with EIO.
    Fail,
    /// A write reaching the limit lands only its first half, then fails; later I/Os fail.
    TearWrite,
}

/// Wraps a device and fails I/O number `limit` (counting reads, writes and flushes from
/// zero) and everything after it.
#[derive(Debug)]
pub struct FaultyDevice {
    inner: Arc<dyn BlockDevice>,
    limit: AtomicU64,
    count: AtomicU64,
    mode: FaultMode,
}

impl FaultyDevice {
    /// A device that fails from I/O number `limit` on (`u64::MAX`: never).
    pub fn new(inner: Arc<dyn BlockDevice>, limit: u64, mode: FaultMode) -> Self {
        Self {
            inner,
            limit: AtomicU64::new(limit),
            count: AtomicU64::new(0),
            mode,
        }
    }

    /// Moves the failure point: I/O number `limit` from now on fails.
    pub fn fail_after(&self, ios_from_now: u64) {
        let now = self.count.load(Ordering::SeqCst);
        self.limit
            .store(now.saturating_add(ios_from_now), Ordering::SeqCst);
    }

    /// How many I/Os were attempted.
    pub fn io_count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Returns `Some(is_first_failure)` when this I/O must fail.
    fn tick(&self) -> Option<bool> {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        let limit = self.limit.load(Ordering::SeqCst);
        (n >= limit).then_some(n == limit)
    }
}

fn injected() -> io::Error {
    io::Error::other("injected device fault")
}

impl BlockDevice for FaultyDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self.tick() {
            Some(_) => Err(injected()),
            None => self.inner.read_at(buf, offset),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self.tick() {
            Some(true) if self.mode == FaultMode::TearWrite => {
                self.inner.write_at(&buf[..buf.len() / 2], offset)?;
                Err(injected())
            }
            Some(_) => Err(injected()),
            None => self.inner.write_at(buf, offset),
        }
    }

    fn flush(&self) -> io::Result<()> {
        match self.tick() {
            Some(_) => Err(injected()),
            None => self.inner.flush(),
        }
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    #[test]
    fn fails_from_the_limit_on_and_tears_the_first_failing_write() {
        let mem = Arc::new(MemDevice::new(64));
        let dev = FaultyDevice::new(mem.clone(), 1, FaultMode::TearWrite);
        dev.write_at(&[1; 8], 0).unwrap();
        assert!(dev.write_at(&[2; 8], 8).is_err());
        assert!(dev.write_at(&[3; 8], 16).is_err());
        let mut buf = [0u8; 24];
        mem.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..8], &[1; 8]);
        assert_eq!(&buf[8..16], &[2, 2, 2, 2, 0, 0, 0, 0]);
        assert_eq!(&buf[16..], &[0; 8]);
        assert_eq!(dev.io_count(), 3);
    }
}
