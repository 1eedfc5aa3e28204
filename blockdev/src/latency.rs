//! A device that adds a fixed delay to every I/O, to emulate slower media.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::BlockDevice;

/// The last part of every delay is spun, because a sleeping thread wakes up this late or
/// later; delays shorter than this are spun whole. Sleeping the rest keeps a slow device from
/// burning a core per I/O in flight, as real media would not.
const SPIN_TAIL: Duration = Duration::from_micros(20);

thread_local! {
    /// Whether this thread's timer slack is down to 1 ns (the default, 50 µs, would make
    /// every sleep that much longer).
    static PRECISE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

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
        pause(self.delay);
    }
}

/// Waits `delay` precisely: sleeps most of it and spins the last [`SPIN_TAIL`]. Also used
/// to emulate network round trips.
pub fn pause(delay: Duration) {
    let deadline = Instant::now() + delay;
    if delay > SPIN_TAIL {
        if !PRECISE.get() {
            // SAFETY: PR_SET_TIMERSLACK changes a number of the calling thread; no memory
            // is passed.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
            PRECISE.set(true);
        }
        std::thread::sleep(delay - SPIN_TAIL);
    }
    spin_until(deadline);
}

/// Waits `delay` on the CPU alone: exact to a fraction of a microsecond where a sleeping
/// thread can wake tens of microseconds late. For emulating network round trips, whose
/// length is what is measured.
pub fn spin(delay: Duration) {
    spin_until(Instant::now() + delay);
}

fn spin_until(deadline: Instant) {
    while Instant::now() < deadline {
        std::hint::spin_loop();
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

    #[test]
    fn every_access_takes_at_least_the_delay() {
        for delay in [Duration::from_micros(3), Duration::from_micros(80)] {
            let dev = LatencyDevice::new(Arc::new(MemDevice::new(4096)), delay);
            let mut buf = [0u8; 4096];
            let start = Instant::now();
            for _ in 0..10 {
                dev.read_at(&mut buf, 0).unwrap();
            }
            assert!(start.elapsed() >= delay * 10);
        }
    }
}
