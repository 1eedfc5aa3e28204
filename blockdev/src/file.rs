//! Image files and real block devices.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::aligned::{AlignedBuf, DIRECT_ALIGN};
use crate::{BlockDevice, check_range};

/// How to open a device.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Bypass the host page cache (O_DIRECT). Unaligned accesses go through bounce buffers.
    pub direct: bool,
    /// Open read-only; writes fail with `PermissionDenied`.
    pub read_only: bool,
}

/// A sparse image file or a block device (`/dev/loopN`, NVMe).
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    len: u64,
    is_block_device: bool,
    direct: bool,
    read_only: bool,
    /// Serialises read-modify-write of partially covered sectors under O_DIRECT.
    rmw: Mutex<()>,
}

impl FileDevice {
    /// Creates a sparse image file of `len` bytes. Fails if `path` exists.
    pub fn create_image(path: &Path, len: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(len)?;
        drop(file);
        Self::open(path, OpenOptions::default())
    }

    /// Opens an existing image file or block device.
    pub fn open(path: &Path, opts: OpenOptions) -> io::Result<Self> {
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path)?;
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let len = if is_block_device {
            block_device_size(&file)?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            len,
            is_block_device,
            direct: opts.direct,
            read_only: opts.read_only,
            rmw: Mutex::new(()),
        })
    }

    /// Takes an exclusive advisory lock on the device, waiting up to `wait` for another
    /// holder (a daemon still committing after unmount) to let go. Held until drop.
    pub fn lock_exclusive(&self, wait: std::time::Duration) -> io::Result<()> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            // SAFETY: flock only takes the descriptor and flags; the fd is open.
            let rc = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK)
                || std::time::Instant::now() >= deadline
            {
                return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!(
                            "{} is in use by another nearfs process",
                            self.path.display()
                        ),
                    )
                } else {
                    err
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a block device rather than an image file.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    fn is_aligned(buf: &[u8], offset: u64) -> bool {
        offset.is_multiple_of(DIRECT_ALIGN as u64)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
    }

    /// The aligned window `[start, start + len)` that covers `[offset, offset + n)`.
    fn covering(offset: u64, n: usize) -> (u64, usize) {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + n as u64).next_multiple_of(a);
        (start, (end - start) as usize)
    }
}

impl BlockDevice for FileDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        if !self.direct || Self::is_aligned(buf, offset) {
            return self.file.read_exact_at(buf, offset);
        }
        let (start, len) = Self::covering(offset, buf.len());
        let mut bounce = AlignedBuf::new(len);
        self.file.read_exact_at(&mut bounce[..len], start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "device opened read-only",
            ));
        }
        check_range(offset, buf.len(), self.len)?;
        if !self.direct || Self::is_aligned(buf, offset) {
            return self.file.write_all_at(buf, offset);
        }
        let (start, len) = Self::covering(offset, buf.len());
        let mut bounce = AlignedBuf::new(len);
        let _guard = self.rmw.lock().unwrap_or_else(|e| e.into_inner());
        self.file.read_exact_at(&mut bounce[..len], start)?;
        let skip = (offset - start) as usize;
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&bounce[..len], start)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len as usize, self.len)?;
        if !self.is_block_device && !self.read_only {
            // SAFETY: fallocate only reads its integer arguments; the fd is open for writing.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
        }
        let zeros = AlignedBuf::new((1usize << 20).min(len as usize));
        let mut done = 0;
        while done < len {
            let n = (zeros.len() as u64).min(len - done) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_sparse_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let dev = FileDevice::create_image(&path, 64 << 20).unwrap();
        assert_eq!(dev.len(), 64 << 20);
        dev.write_at(b"hello", 4093).unwrap();
        let mut buf = [0u8; 7];
        dev.read_at(&mut buf, 4092).unwrap();
        assert_eq!(&buf, b"\0hello\0");
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);
        assert!(
            FileDevice::create_image(&path, 1 << 20).is_err(),
            "create must not clobber"
        );
    }

    #[test]
    fn accesses_past_the_end_fail() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::create_image(&dir.path().join("d.img"), 8192).unwrap();
        let mut buf = [0u8; 2];
        assert!(dev.read_at(&mut buf, 8191).is_err());
        assert!(dev.write_at(&buf, u64::MAX).is_err());
    }

    #[test]
    fn direct_io_handles_unaligned_access() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        drop(FileDevice::create_image(&path, 1 << 20).unwrap());
        let opts = OpenOptions {
            direct: true,
            read_only: false,
        };
        let dev = match FileDevice::open(&path, opts) {
            Ok(d) => d,
            // tmpfs has no O_DIRECT; nothing to test there.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => panic!("{e}"),
        };
        dev.write_at(b"across a sector", 4090).unwrap();
        let mut buf = [0u8; 15];
        dev.read_at(&mut buf, 4090).unwrap();
        assert_eq!(&buf, b"across a sector");
        dev.write_zeroes(4096, 4096).unwrap();
        dev.read_at(&mut buf, 4090).unwrap();
        assert_eq!(&buf[..6], b"across");
        assert_eq!(&buf[6..], &[0u8; 9]);
    }
}
