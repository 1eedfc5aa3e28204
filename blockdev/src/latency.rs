//! A device that adds a fixed delay to every I/O, to emulate slower media.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::BlockDevice;

/// Below this, a delay is spun rather than slept: sleeping cannot wake up that precisely.
const SPIN_BELOW: Duration = Duration::from_micros(200);

/// Wraps a device and delays each read and write by a fixed amount (e.g. ~3 µs for an
/// Optane-like device, ~80 µs for NAND flash).
#[derive(Debug)]
pub struct LatencyDevice {
    inner: Arc<dyn BlockDevice>,
    delay: Duration,
}

impl LatencyDevice {
    /// Adds `delay` to every read and write of `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>, delay: Duration) -> Self {
        Self { inner, delay }
    }

    fn wait(&self) {
        if self.delay < SPIN_BELOW {
            let start = Instant::now();
            while start.elapsed() < self.delay {
                std::hint::spin_loop();
            }
        } else {
            std::thread::sleep(self.delay);
        }
    }
}

impl BlockDevice for LatencyDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.wait();
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.wait();
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
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
    fn passes_every_access_through_unchanged() {
        let mem = Arc::new(MemDevice::new(8192));
        let dev = LatencyDevice::new(mem.clone(), Duration::from_micros(3));
        dev.write_at(b"slow but right", 4000).unwrap();
        let mut buf = [0u8; 14];
        dev.read_at(&mut buf, 4000).unwrap();
        assert_eq!(&buf, b"slow but right");
        mem.read_at(&mut buf, 4000).unwrap();
        assert_eq!(&buf, b"slow but right");
        assert_eq!(dev.len(), 8192);
        assert!(dev.read_at(&mut buf, 8190).is_err());
    }
}
