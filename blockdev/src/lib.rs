//! The block-device layer: everything nearfs stores goes through [`BlockDevice`].
//!
//! One real backend ([`FileDevice`], for sparse image files and for block devices, with
//! O_DIRECT available) and the backends tests and benchmarks need: [`MemDevice`],
//! [`FaultyDevice`] (fails or tears a write after N I/Os), [`LatencyDevice`] (adds a fixed
//! delay per I/O) and [`CrashDevice`] (keeps the write log so that a power cut can be
//! simulated at any write). Filesystem code never touches a `File` directly.

mod aligned;
mod crash;
mod fault;
mod file;
mod latency;
mod mem;

use std::fmt::Debug;
use std::io;

pub use aligned::{AlignedBuf, DIRECT_ALIGN};
pub use crash::{CrashDevice, WriteLog};
pub use fault::{FaultMode, FaultyDevice};
pub use file::{FileDevice, OpenOptions};
pub use latency::{LatencyDevice, pause, spin};
pub use mem::MemDevice;

/// A byte-addressed device of fixed length.
///
/// Reads and writes are positional and may be issued from many threads at once. A write
/// that returned is visible to later reads; it is durable only after [`BlockDevice::flush`]
/// returned. Accesses past [`BlockDevice::len`] fail with `InvalidInput`; they never grow
/// the device.
pub trait BlockDevice: Send + Sync + Debug {
    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> io::Result<()>;

    /// Size of the device in bytes.
    fn len(&self) -> u64;

    /// Sets `[offset, offset + len)` to zeros. Backends override this when they can do it
    /// without moving the bytes (hole punching, `BLKZEROOUT`).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Whether the device has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks that `[offset, offset + len)` lies inside a device of `dev_len` bytes.
pub fn check_range(offset: u64, len: usize, dev_len: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= dev_len => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("access [{offset}, +{len}) is outside the device of {dev_len} bytes"),
        )),
    }
}
