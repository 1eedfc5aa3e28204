//! The FUSE session: the handshake with the kernel, the threads that take its requests
//! and the way replies and notifications go back. Written here rather than taken from a
//! crate so that requests can arrive over io_uring as well as through `/dev/fuse`
//! ([`uring`]): with a queue per CPU, a request is served on the CPU that made it, and a
//! round trip costs a context switch instead of waking another CPU (docs/benchmarks.md).
//!
//! What a request means is not decided here: a [`Handler`] (the daemon) gets each one
//! with its arguments and a [`Reply`] to answer it with, now or from another thread.

pub mod abi;
pub mod uring;

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crate::errno::Errno;
use abi::{Args, InHeader, op};

/// What the daemon asks of the kernel at INIT.
#[derive(Clone, Copy, Debug)]
pub struct InitConfig {
    /// Largest write (and read) request.
    pub max_write: u32,
    pub max_readahead: u32,
    /// `abi::init` bits wanted; those the kernel lacks are dropped.
    pub flags: u64,
    /// Serve requests over io_uring if the kernel offers it.
    pub uring: bool,
}

/// One request: its header and the arguments after it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub header: InHeader,
    pub args: Args<'a>,
}

/// Serves requests. Called from many threads at once.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request and answers it through `reply` (requests that take no answer,
    /// FORGET and INTERRUPT, get a reply that sends nothing).
    fn handle(&self, req: Request<'_>, reply: Reply);
}

/// Where a reply goes: the `/dev/fuse` descriptor its request was read from, or the
/// io_uring entry that carried it.
enum Sender {
    Dev(Arc<File>),
    Ring(uring::Entry),
}

/// The answer to one request. Dropped unanswered (a panic on the way), it answers EIO, so
/// that the caller is never left waiting.
pub struct Reply {
    unique: u64,
    sender: Option<Sender>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("unique", &self.unique)
            .finish()
    }
}

impl Reply {
    fn new(unique: u64, sender: Sender) -> Reply {
        Reply {
            unique,
            sender: Some(sender),
        }
    }

    /// A reply for a request the kernel expects no answer to.
    pub(crate) fn none() -> Reply {
        Reply {
            unique: 0,
            sender: None,
        }
    }

    pub fn error(mut self, e: Errno) {
        self.send(-e.0, &[]);
    }

    /// Success with nothing more to say.
    pub fn ok(mut self) {
        self.send(0, &[]);
    }

    /// Success with these bytes after the header.
    pub fn data(mut self, parts: &[&[u8]]) {
        self.send(0, parts);
    }

    /// The answer to an ioctl that succeeded: result 0 and `output`.
    pub fn ioctl(self, output: &[u8]) {
        // fuse_ioctl_out: result, flags, in_iovs, out_iovs.
        self.data(&[&[0; 16], output]);
    }

    /// A reply to `unique` written to `file` (tests read it back from a pipe).
    #[cfg(test)]
    pub(crate) fn to_file(unique: u64, file: File) -> Reply {
        Reply::new(unique, Sender::Dev(Arc::new(file)))
    }

    fn send(&mut self, error: i32, parts: &[&[u8]]) {
        let Some(sender) = self.sender.take() else {
            return;
        };
        let len = abi::OUT_HEADER + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut header = [0u8; abi::OUT_HEADER];
        header[..4].copy_from_slice(&(len as u32).to_le_bytes());
        header[4..8].copy_from_slice(&error.to_le_bytes());
        header[8..].copy_from_slice(&self.unique.to_le_bytes());
        let result = match sender {
            Sender::Dev(dev) => write_parts(&dev, &header, parts),
            Sender::Ring(entry) => entry.commit(&header, parts),
        };
        // ENOENT: the request was interrupted and is gone; nothing to do.
        if let Err(e) = result
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::warn!(error = %e, unique = self.unique, "cannot send a FUSE reply");
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.sender.is_some() {
            self.send(-libc::EIO, &[]);
        }
    }
}

/// Writes one message (header and parts) to `/dev/fuse` in one `writev`.
fn write_parts(dev: &File, header: &[u8], parts: &[&[u8]]) -> io::Result<()> {
    let mut iov = Vec::with_capacity(parts.len() + 1);
    iov.push(IoSlice::new(header));
    iov.extend(
        parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p)),
    );
    // SAFETY: every iovec points into a live slice; the count matches the vector.
    let n = unsafe {
        libc::writev(
            dev.as_raw_fd(),
            iov.as_ptr().cast(),
            iov.len() as libc::c_int,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends notifications (cache invalidations) to the kernel.
#[derive(Clone, Debug)]
pub struct Notifier {
    dev: Arc<File>,
}

impl Notifier {
    /// Drops the kernel's cached attributes of `ino` and, unless `offset` is negative, its
    /// pages from `offset` for `len` bytes (0: to the end). An inode the kernel does not
    /// know is no error: it holds nothing of it.
    pub fn inval_inode(&self, ino: u64, offset: i64, len: i64) -> io::Result<()> {
        let mut m = abi::Out::with_capacity(40);
        m.u32(40).i32(abi::NOTIFY_INVAL_INODE).u64(0);
        m.u64(ino).u64(offset as u64).u64(len as u64);
        match write_parts(&self.dev, &m.0, &[]) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }
}

/// A mounted FUSE connection after its handshake.
pub struct Session {
    dev: Arc<File>,
    config: InitConfig,
    /// Threads serving requests (per CPU over io_uring, else in all).
    threads: usize,
    /// The io_uring queues, when the kernel and the daemon agreed on them.
    rings: Option<uring::Prepared>,
}

/// How long a thread waits before it tries reading `/dev/fuse` again after an error it
/// cannot name (to keep a broken descriptor from spinning a CPU).
const RETRY_PAUSE: Duration = Duration::from_millis(10);

impl Session {
    /// Completes the handshake on a freshly mounted `/dev/fuse` descriptor: reads INIT and
    /// answers it with `config`. Requests will be served by `threads` threads, or over
    /// io_uring by that many per CPU (at least one).
    pub fn new(dev: OwnedFd, mut config: InitConfig, threads: usize) -> io::Result<Session> {
        let dev = File::from(dev);
        let mut buf = vec![0u8; request_buffer(config.max_write)];
        loop {
            let n = read_request(&dev, &mut buf)?
                .ok_or_else(|| io::Error::other("the mount went away during the handshake"))?;
            let Some(h) = InHeader::parse(&buf[..n]) else {
                return Err(io::Error::other(
                    "malformed FUSE request during the handshake",
                ));
            };
            let reply = Reply::new(h.unique, Sender::Dev(Arc::new(dev.try_clone()?)));
            if h.opcode != op::INIT {
                reply.error(Errno::EIO);
                return Err(io::Error::other("the kernel sent a request before INIT"));
            }
            let mut a = Args(&buf[abi::IN_HEADER..n]);
            let (Some(major), Some(minor), Some(readahead), Some(low)) =
                (a.u32(), a.u32(), a.u32(), a.u32())
            else {
                reply.error(Errno::EIO);
                return Err(io::Error::other("malformed INIT"));
            };
            if major > abi::MAJOR {
                // A newer kernel protocol: say which one we speak and wait for another INIT.
                let mut o = abi::Out::default();
                o.u32(abi::MAJOR).u32(abi::MINOR).zeros(56);
                reply.data(&[&o.0]);
                continue;
            }
            if major < abi::MAJOR || minor < 31 {
                reply.error(Errno::EPROTO);
                return Err(io::Error::other(format!(
                    "the kernel's FUSE protocol {major}.{minor} is too old (7.31 at least)"
                )));
            }
            let mut offered = u64::from(low);
            if offered & abi::init::INIT_EXT != 0
                && let Some(high) = a.u32()
            {
                offered |= u64::from(high) << 32;
            }
            let mut flags = config.flags & offered | (offered & abi::init::INIT_EXT);
            // The rings are made before the reply, so that if they cannot be, the kernel
            // is not told to wait for them.
            let mut rings = None;
            if config.uring && flags & abi::init::OVER_IO_URING != 0 {
                let per_queue = threads.div_ceil(uring::possible_cpus().unwrap_or(1).max(1));
                match uring::prepare(&dev, config.max_write, per_queue) {
                    Ok(r) => rings = Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot set up FUSE over io_uring; serving /dev/fuse");
                    }
                }
            }
            if rings.is_none() {
                flags &= !abi::init::OVER_IO_URING;
            }
            config.max_readahead = config.max_readahead.min(readahead);
            let page = page_size();
            let mut o = abi::Out::with_capacity(64);
            o.u32(abi::MAJOR).u32(abi::MINOR).u32(config.max_readahead);
            o.u32(flags as u32);
            o.u16(16).u16(12); // max_background, congestion_threshold
            o.u32(config.max_write).u32(1); // max_write, time_gran (1 ns)
            o.u16((config.max_write / page) as u16).u16(0); // max_pages, map_alignment
            o.u32((flags >> 32) as u32).zeros(28);
            reply.data(&[&o.0]);
            return Ok(Session {
                dev: Arc::new(dev),
                config,
                threads,
                rings,
            });
        }
    }

    pub fn notifier(&self) -> Notifier {
        Notifier {
            dev: self.dev.clone(),
        }
    }

    /// Whether requests arrive over io_uring.
    pub fn over_uring(&self) -> bool {
        self.rings.is_some()
    }

    /// Serves requests until the filesystem is unmounted: over io_uring, with threads on
    /// each CPU's queue and two more on `/dev/fuse` for what never goes through a queue
    /// (FORGET, INTERRUPT); else with all threads on `/dev/fuse`.
    pub fn run(self, handler: Arc<dyn Handler>) -> io::Result<()> {
        let (rings, threads) = match self.rings {
            Some(r) => (Some(r.start(handler.clone())?), 2),
            None => (None, self.threads),
        };
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            // A clone needs /dev/fuse opened again, which a user other than root may not
            // (fusermount3 opened the first one); then the threads share that one.
            let dev = match clone_dev(&self.dev) {
                Ok(clone) => Arc::new(clone),
                Err(e) => {
                    if i == 0 {
                        tracing::info!(error = %e, "cannot clone /dev/fuse; threads share one descriptor");
                    }
                    self.dev.clone()
                }
            };
            let handler = handler.clone();
            let max_write = self.config.max_write;
            workers.push(
                std::thread::Builder::new()
                    .name(format!("fuse-{i}"))
                    .spawn(move || serve_dev(&dev, &*handler, max_write))?,
            );
        }
        let mut result = Ok(());
        for w in workers {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("a FUSE thread panicked")),
            }
        }
        if let Some(r) = rings {
            r.stop();
        }
        result
    }
}

/// The kernel's page size (max_pages and the io_uring payload are counted in pages).
fn page_size() -> u32 {
    // SAFETY: sysconf takes no pointers.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

/// A request buffer large enough for the largest write and its headers.
fn request_buffer(max_write: u32) -> usize {
    max_write as usize + 64 * 1024
}

/// Reads one request; `None` once the filesystem is unmounted.
fn read_request(dev: &File, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Interrupted before it was read, or a signal: read again.
            Some(libc::ENOENT | libc::EINTR | libc::EAGAIN) => continue,
            Some(libc::ENODEV) => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// A second descriptor of the same connection (`FUSE_DEV_IOC_CLONE`), so that each thread
/// reads and answers through its own.
fn clone_dev(dev: &File) -> io::Result<File> {
    let clone = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mut fd = dev.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 from the pointer, which is valid.
    if unsafe { libc::ioctl(clone.as_raw_fd(), abi::DEV_IOC_CLONE, &mut fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(clone)
}

/// Answers the requests read from one `/dev/fuse` descriptor until unmount.
fn serve_dev(dev: &Arc<File>, handler: &dyn Handler, max_write: u32) -> io::Result<()> {
    let mut buf = vec![0u8; request_buffer(max_write)];
    loop {
        let n = match read_request(dev, &mut buf) {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "cannot read /dev/fuse");
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
        };
        dispatch(&buf[..n], handler, || Sender::Dev(dev.clone()));
    }
}

/// Hands one request (header and arguments, as the kernel wrote them) to `handler`.
fn dispatch(msg: &[u8], handler: &dyn Handler, sender: impl FnOnce() -> Sender) {
    let Some(header) = InHeader::parse(msg) else {
        tracing::error!(len = msg.len(), "a FUSE request shorter than its header");
        return;
    };
    let reply = match header.opcode {
        op::FORGET | op::BATCH_FORGET | op::INTERRUPT | op::NOTIFY_REPLY => Reply::none(),
        _ => Reply::new(header.unique, sender()),
    };
    if header.len as usize != msg.len() {
        tracing::error!(
            opcode = header.opcode,
            "a FUSE request whose length is wrong"
        );
        return reply.error(Errno::EIO);
    }
    let req = Request {
        header,
        args: Args(&msg[abi::IN_HEADER..]),
    };
    // A panic costs its caller an EIO (the reply's drop sends it), never the thread:
    // over io_uring that thread is the only one serving its CPU's queue.
    let handled =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(req, reply)));
    if handled.is_err() {
        tracing::error!(
            opcode = header.opcode,
            "a FUSE request's handler panicked; its caller gets EIO"
        );
    }
}
