//! A device that remembers every write, so that a power cut can be simulated afterwards at
//! any point of the write stream.

use std::io;
use std::sync::Mutex;

use crate::{BlockDevice, MemDevice, check_range};

/// One event in the order the device saw it.
#[derive(Clone, Debug)]
enum Event {
    Write { offset: u64, data: Vec<u8> },
    Flush,
}

/// An in-memory device that logs writes and flushes.
#[derive(Debug)]
pub struct CrashDevice {
    live: MemDevice,
    initial: Vec<u8>,
    log: Mutex<Vec<Event>>,
}

/// The writes a [`CrashDevice`] saw, from which crash images are built.
#[derive(Clone, Debug)]
pub struct WriteLog {
    initial: Vec<u8>,
    events: Vec<Event>,
}

impl CrashDevice {
    /// Starts logging on top of `initial` contents.
    pub fn new(initial: Vec<u8>) -> Self {
        Self {
            live: MemDevice::from_bytes(initial.clone()),
            initial,
            log: Mutex::new(Vec::new()),
        }
    }

    /// Number of writes so far.
    pub fn writes(&self) -> usize {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter()
            .filter(|e| matches!(e, Event::Write { .. }))
            .count()
    }

    /// Everything logged so far.
    pub fn log(&self) -> WriteLog {
        let events = self.log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        WriteLog {
            initial: self.initial.clone(),
            events,
        }
    }
}

impl WriteLog {
    /// Number of writes in the log.
    pub fn writes(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::Write { .. }))
            .count()
    }

    /// The device as it would be after power was cut just before write number `n`, with
    /// every earlier write having reached the media (in order).
    pub fn image_after_writes(&self, n: usize) -> Vec<u8> {
        let mut image = self.initial.clone();
        for (offset, data) in self.write_iter().take(n) {
            image[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        image
    }

    /// The device after a power cut just before write number `n`, where only what the last
    /// flush before it made durable survived: every unflushed write is lost.
    pub fn durable_image_before(&self, n: usize) -> Vec<u8> {
        let mut seen = 0;
        let mut durable = 0;
        for e in &self.events {
            match e {
                Event::Write { .. } if seen == n => break,
                Event::Write { .. } => seen += 1,
                Event::Flush => durable = seen,
            }
        }
        self.image_after_writes(durable)
    }

    fn write_iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.events.iter().filter_map(|e| match e {
            Event::Write { offset, data } => Some((*offset, data.as_slice())),
            Event::Flush => None,
        })
    }
}

impl BlockDevice for CrashDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.live.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.live.len())?;
        // The log lock orders the write with respect to flushes.
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        self.live.write_at(buf, offset)?;
        log.push(Event::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Event::Flush);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_images_follow_the_write_order_and_flushes() {
        let dev = CrashDevice::new(vec![0; 4]);
        dev.write_at(&[1], 0).unwrap();
        dev.flush().unwrap();
        dev.write_at(&[2], 1).unwrap();
        dev.write_at(&[3], 2).unwrap();
        let log = dev.log();
        assert_eq!(log.writes(), 3);
        assert_eq!(log.image_after_writes(0), vec![0, 0, 0, 0]);
        assert_eq!(log.image_after_writes(2), vec![1, 2, 0, 0]);
        assert_eq!(log.durable_image_before(2), vec![1, 0, 0, 0]);
        assert_eq!(log.durable_image_before(3), vec![1, 0, 0, 0]);
    }
}
