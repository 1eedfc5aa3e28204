//! The client side: [`NbdDevice`], a [`BlockDevice`] on an export of any NBD server, and
//! runs of appcode at a target that offers the nearfs extension.
//!
//! The device keeps a pool of connections. A request takes an idle connection (or opens
//! one, up to the limit), sends, reads its reply on the calling thread and gives the
//! connection back: as many requests are in flight as threads ask at once, and none waits
//! for a thread switch. Every request has a deadline however the server spreads its bytes,
//! so I/O to a target that vanished or stalls fails with an error in bounded time. A
//! connection that failed is dropped, and the next request opens a new one, which is how
//! the device reconnects; that first new connection checks it reached the same filesystem
//! ([`NbdDevice::pin`]) and fences the old ones at the target ([`NbdDevice::failed`]), so
//! that nothing given up on can land after what comes next.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use appcode::{Extent, Outcome, Request as RunArgs, RunError};
use blockdev::BlockDevice;

use crate::appcode_ext::{self, RunRequest};
use crate::wire::{self, Chunk, Put, Request, chunk, cmd, errno, flag, opt, rep};

/// The port NBD servers listen on.
pub const DEFAULT_PORT: u16 = 10809;
/// INFO replies a GO may bring before the client gives up on the server.
const MAX_INFO_REPLIES: usize = 64;

/// `nbd://HOST[:PORT]/EXPORT`, as qemu writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUrl {
    pub host: String,
    pub port: u16,
    pub export: String,
}

impl NbdUrl {
    /// Parses a URL; `None` if it is not an `nbd://` URL at all, `Some(Err)` if it is a
    /// malformed one.
    pub fn parse(s: &str) -> Option<Result<NbdUrl, String>> {
        let rest = s.strip_prefix("nbd://")?;
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 address in brackets has colons of its own.
            Some((h, p)) if !p.contains(']') => match p.parse() {
                Ok(p) => (h, p),
                Err(_) => return Some(Err(format!("{s}: {p:?} is not a port"))),
            },
            _ => (authority, DEFAULT_PORT),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Some(Err(format!("{s}: no host")));
        }
        if export.len() > wire::MAX_NAME {
            return Some(Err(format!("{s}: the export name is too long")));
        }
        Some(Ok(NbdUrl {
            host: host.to_string(),
            port,
            export: export.to_string(),
        }))
    }
}

impl fmt::Display for NbdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "nbd://[{}]:{}/{}", self.host, self.port, self.export)
        } else {
            write!(f, "nbd://{}:{}/{}", self.host, self.port, self.export)
        }
    }
}

/// How the device talks to its server.
#[derive(Clone, Debug)]
pub struct Options {
    /// Connections at most (one if the server does not allow several).
    pub connections: usize,
    /// Added to every round trip (spun on the CPU), to emulate a network farther away than
    /// this one (the kernel here has no netem).
    pub delay: Duration,
    /// How long one request, or connecting, may take before it fails.
    pub timeout: Duration,
    /// Whether to ask for the appcode extension, claiming the export for this token
    /// (one nearfs mount owns an export at a time).
    pub appcode: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connections: 4,
            delay: Duration::ZERO,
            timeout: Duration::from_secs(10),
            appcode: None,
        }
    }
}

/// What the client has sent and received, for `user.nearfs.fs`.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub connects: AtomicU64,
}

/// A program the daemon loaded, as it is sent to a target: loaded on a connection the
/// first time a run there needs it. The target forgets it when the connection closes;
/// connections unload it once this is dropped.
#[derive(Debug)]
pub struct RemoteProgram {
    key: u64,
    name: String,
    object: Vec<u8>,
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

impl RemoteProgram {
    pub fn new(name: &str, object: Vec<u8>) -> Arc<RemoteProgram> {
        Arc::new(RemoteProgram {
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            object,
        })
    }

    pub fn object_len(&self) -> usize {
        self.object.len()
    }
}

/// What a target was asked to run over.
#[derive(Clone, Debug)]
pub struct RemoteWorld<'a> {
    pub extents: &'a [Extent],
    pub file_size: u64,
    pub range: Range<u64>,
    pub writable: bool,
}

/// Why a run was not done at the target; the caller runs it itself.
#[derive(Debug)]
pub enum NotAtTarget {
    /// The target does not offer the extension.
    Unsupported,
    /// The target refused the program (its verifier, or its limits).
    Refused(String),
}

/// An export of an NBD server as a block device.
pub struct NbdDevice {
    url: NbdUrl,
    options: Options,
    size: u64,
    flags: u16,
    appcode: bool,
    pool: Mutex<Pool>,
    returned: Condvar,
    /// Odd after a failure until a new connection fenced; connections opened before the
    /// last fence are not used (see [`NbdDevice::failed`]).
    fence: Mutex<u64>,
    /// Bytes every new connection must find where they were (see [`NbdDevice::pin`]).
    pinned: Mutex<Option<(u64, Vec<u8>)>>,
    counters: Arc<Counters>,
}

struct Pool {
    idle: Vec<Conn>,
    /// Connections open, idle or in use.
    open: usize,
    /// How many may be.
    max: usize,
}

impl fmt::Debug for NbdDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdDevice")
            .field("url", &self.url.to_string())
            .field("size", &self.size)
            .field("appcode", &self.appcode)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NbdDevice {
    /// Connects once to learn the export; further connections open as requests need them.
    pub fn connect(url: &NbdUrl, options: Options) -> io::Result<NbdDevice> {
        let counters = Arc::new(Counters::default());
        let first = Conn::open(url, &options, &counters)?;
        let max = if first.flags & flag::CAN_MULTI_CONN != 0 {
            options.connections.max(1)
        } else {
            // Without it a flush on one connection need not cover writes made on another.
            1
        };
        Ok(NbdDevice {
            url: url.clone(),
            size: first.size,
            flags: first.flags,
            appcode: first.appcode,
            options,
            pool: Mutex::new(Pool {
                idle: vec![first],
                open: 1,
                max,
            }),
            returned: Condvar::new(),
            fence: Mutex::new(0),
            pinned: Mutex::new(None),
            counters,
        })
    }

    pub fn url(&self) -> &NbdUrl {
        &self.url
    }

    /// Whether the target runs appcode (it offered the nearfs extension).
    pub fn offers_appcode(&self) -> bool {
        self.appcode
    }

    pub fn read_only(&self) -> bool {
        self.flags & flag::READ_ONLY != 0
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Records the `len` bytes at `offset` (a filesystem's uuid): every connection opened
    /// later reads them first and is refused if they differ. A server restarted on
    /// another image of the same size, at the same address, gets no write from this
    /// device.
    pub fn pin(&self, offset: u64, len: usize) -> io::Result<()> {
        let mut b = vec![0; len];
        self.read_at(&mut b, offset)?;
        *lock(&self.pinned) = Some((offset, b));
        Ok(())
    }

    /// Runs `f` on a connection; a connection that failed is closed rather than given back.
    fn with_conn<R>(&self, f: impl FnOnce(&mut Conn) -> io::Result<R>) -> io::Result<R> {
        let mut c = match self.take_conn() {
            Some(c) => c,
            None => match self.open_conn() {
                Ok(c) => c,
                Err(e) => {
                    self.closed();
                    return Err(e);
                }
            },
        };
        let r = f(&mut c);
        // A reply that was an error came whole; anything else may leave the stream where
        // it cannot be trusted, and a request the server may still be working on.
        if c.intact {
            lock(&self.pool).idle.push(c);
            self.returned.notify_one();
        } else {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            self.failed();
            self.closed();
        }
        r
    }

    /// An idle connection, or `None` after counting one that the caller opens.
    fn take_conn(&self) -> Option<Conn> {
        let mut pool = lock(&self.pool);
        loop {
            if let Some(c) = pool.idle.pop() {
                // A server that restarted closed the connections it had; connections from
                // before a failure were closed by the fence after it. Both are dropped
                // here, not found out by the next request, which would fail.
                if c.closed_by_server() || c.generation != *lock(&self.fence) {
                    pool.open -= 1;
                    continue;
                }
                return Some(c);
            }
            if pool.open < pool.max {
                pool.open += 1;
                return None;
            }
            pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Opens a connection; the first after a failure fences first.
    fn open_conn(&self) -> io::Result<Conn> {
        let mut c = Conn::open(&self.url, &self.options, &self.counters)?;
        if c.size != self.size || c.appcode != self.appcode {
            return Err(io::Error::other(format!(
                "{} changed while it was in use (size or extension)",
                self.url
            )));
        }
        let pinned = lock(&self.pinned).clone();
        if let Some((at, want)) = pinned {
            let mut got = vec![0; want.len()];
            c.read(&mut got, at)?;
            if got != want {
                return Err(io::Error::other(format!(
                    "{} now holds another filesystem (its identifying bytes changed); \
                     nothing more is sent to it",
                    self.url
                )));
            }
        }
        let mut generation = lock(&self.fence);
        if !generation.is_multiple_of(2) {
            if self.appcode {
                c.simple(cmd::NEARFS_FENCE, 0, 0, 0, &[])?;
            }
            *generation += 1;
        }
        c.generation = *generation;
        Ok(c)
    }

    /// A request failed with the server perhaps still working on it. Until a new
    /// connection has fenced the old ones at the target (`NEARFS_FENCE`: they are closed
    /// and their requests finished), no request is sent: so nothing the mount gave up on
    /// can change the export after anything it sends later. Servers without the
    /// extension cannot be fenced.
    fn failed(&self) {
        let mut generation = lock(&self.fence);
        if generation.is_multiple_of(2) {
            *generation += 1;
        }
    }

    fn closed(&self) {
        lock(&self.pool).open -= 1;
        self.returned.notify_one();
    }

    /// Runs a program at the target over `world`. `Err` means it was not run there and
    /// the caller should run it itself; a run that failed at the target (including the
    /// target going away during it) is `Ok(Err(_))`.
    pub fn run(
        &self,
        program: &Arc<RemoteProgram>,
        world: RemoteWorld<'_>,
        args: &RunArgs<'_>,
    ) -> Result<Result<Outcome, RunError>, NotAtTarget> {
        if !self.appcode {
            return Err(NotAtTarget::Unsupported);
        }
        let mut request = RunRequest {
            program: 0,
            write: world.writable,
            file_size: world.file_size,
            range: world.range,
            limits: args.limits,
            extents: world.extents.to_vec(),
            arg: args.arg.to_vec(),
        };
        if request.encoded_len() > wire::MAX_PAYLOAD as usize {
            return Err(NotAtTarget::Refused(format!(
                "{} extents do not fit one request",
                request.extents.len()
            )));
        }
        let result = self.with_conn(|c| {
            // A second try if the target no longer knew the program (it restarted).
            for _ in 0..2 {
                // Nothing of the run was sent yet: whatever goes wrong, it can run here.
                let id = match c.program_id(program) {
                    Ok(Ok(id)) => id,
                    Ok(Err(refused)) => return Ok(Err(refused)),
                    Err(e) => return Ok(Err(format!("loading it failed: {e}"))),
                };
                request.program = id;
                if let Some(r) = c.run(&request)? {
                    return Ok(Ok(r));
                }
            }
            Ok(Ok(Err(RunError::Io(
                "the target keeps forgetting the program".into(),
            ))))
        });
        match result {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(refused)) => Err(NotAtTarget::Refused(refused)),
            Err(e) => Ok(Err(RunError::Io(format!("{}: {e}", self.url)))),
        }
    }
}

impl BlockDevice for NbdDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        blockdev::check_range(offset, buf.len(), self.size)?;
        for (i, piece) in buf.chunks_mut(wire::MAX_PAYLOAD as usize).enumerate() {
            let at = offset + i as u64 * wire::MAX_PAYLOAD as u64;
            self.with_conn(|c| c.read(piece, at))?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        blockdev::check_range(offset, buf.len(), self.size)?;
        for (i, piece) in buf.chunks(wire::MAX_PAYLOAD as usize).enumerate() {
            let at = offset + i as u64 * wire::MAX_PAYLOAD as u64;
            self.with_conn(|c| c.simple(cmd::WRITE, 0, at, piece.len() as u32, piece))?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.with_conn(|c| c.simple(cmd::FLUSH, 0, 0, 0, &[]))
    }

    fn len(&self) -> u64 {
        self.size
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        blockdev::check_range(offset, 0, self.size)?;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "past the end of the export",
            ));
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 30);
            self.with_conn(|c| c.simple(cmd::WRITE_ZEROES, 0, offset + done, n as u32, &[]))?;
            done += n;
        }
        Ok(())
    }
}

/// One connection in transmission.
struct Conn {
    stream: TcpStream,
    /// Replies are read through this (the same socket).
    reader: BufReader<TcpStream>,
    size: u64,
    flags: u16,
    structured: bool,
    appcode: bool,
    delay: Duration,
    timeout: Duration,
    /// When the reply to the request in flight must have come, whatever the server does.
    deadline: Instant,
    /// The socket's read timeout now (shortened near a deadline, lengthened for runs).
    read_timeout: Duration,
    /// Which failure of the device this connection came after (see [`NbdDevice::fence`]).
    generation: u64,
    /// Whether the stream is at a message boundary (false once a read or write failed
    /// half-way).
    intact: bool,
    cookie: u64,
    /// Programs loaded on this connection: the daemon's program and the target's id.
    programs: HashMap<u64, (Weak<RemoteProgram>, u64)>,
    counters: Arc<Counters>,
}

/// A server error reply to one request: the connection stays usable.
fn server_error(e: u32, msg: &str) -> io::Error {
    let text = if msg.is_empty() {
        format!("server error {e}")
    } else {
        format!("server error {e}: {msg}")
    };
    io::Error::other(text)
}

impl Conn {
    /// Whether an idle connection can no longer be used: the server closed it (end of
    /// stream, a reset) or sent something unasked. An idle connection has nothing to read.
    fn closed_by_server(&self) -> bool {
        !self.reader.buffer().is_empty() || wire::readable_now(&self.stream) != Some(false)
    }

    fn open(url: &NbdUrl, options: &Options, counters: &Arc<Counters>) -> io::Result<Conn> {
        let addrs = (url.host.as_str(), url.port).to_socket_addrs()?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{}: no address", url.host));
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, options.timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let s = stream.ok_or(last)?;
        s.set_nodelay(true)?;
        wire::keep_alive(&s)?;
        s.set_read_timeout(Some(options.timeout))?;
        s.set_write_timeout(Some(options.timeout))?;
        counters.connects.fetch_add(1, Ordering::Relaxed);
        let until = Instant::now() + options.timeout;
        let (size, flags, structured, appcode) = negotiate(&s, until, url, options.appcode)?;
        s.set_read_timeout(Some(options.timeout))?;
        Ok(Conn {
            reader: BufReader::with_capacity(64 << 10, s.try_clone()?),
            stream: s,
            size,
            flags,
            structured,
            appcode,
            delay: options.delay,
            timeout: options.timeout,
            deadline: Instant::now(),
            read_timeout: options.timeout,
            generation: 0,
            intact: true,
            cookie: 0,
            programs: HashMap::new(),
            counters: counters.clone(),
        })
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        self.send_within(kind, flags, offset, length, payload, self.timeout)
    }

    /// Sends a request whose reply must have come within `time`.
    fn send_within(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        time: Duration,
    ) -> io::Result<u64> {
        if !self.delay.is_zero() {
            // Spun, not slept: a sleep here wakes tens of microseconds late, which would
            // be most of the round trip being emulated.
            blockdev::spin(self.delay);
        }
        self.deadline = Instant::now() + time;
        if self.read_timeout != time {
            self.stream.set_read_timeout(Some(time))?;
            self.read_timeout = time;
        }
        self.cookie += 1;
        let header = Request {
            flags,
            kind,
            cookie: self.cookie,
            offset,
            length,
        }
        .encode();
        self.intact = false;
        if payload.len() < 64 << 10 {
            let mut b = Vec::with_capacity(header.len() + payload.len());
            b.extend_from_slice(&header);
            b.extend_from_slice(payload);
            self.stream.write_all(&b)?;
        } else {
            self.stream.write_all(&header)?;
            self.stream.write_all(payload)?;
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .sent
            .fetch_add((header.len() + payload.len()) as u64, Ordering::Relaxed);
        Ok(self.cookie)
    }

    /// Reads exactly `buf`, by the request's deadline however the server spreads its
    /// bytes.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.reader.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ));
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if done < buf.len() {
                self.near_deadline()?;
            }
        }
        self.counters
            .received
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn recv_vec(&mut self, len: u32, max: u32) -> io::Result<Vec<u8>> {
        if len > max {
            return Err(wire::invalid(format!("a reply of {len} bytes")));
        }
        let mut v = vec![0; len as usize];
        self.recv(&mut v)?;
        Ok(v)
    }

    /// Fails once the deadline passed; near it, shortens the socket's timeout to what is
    /// left.
    fn near_deadline(&mut self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete reply in time",
            ));
        }
        // Shortened only once half the time is gone, so that a reply in time costs no
        // system call: a read then ends by the deadline plus half the request's time.
        if left < self.read_timeout / 2 {
            self.stream.set_read_timeout(Some(left))?;
            self.read_timeout = left;
        }
        Ok(())
    }

    /// Reads the next reply header: a simple reply's error, or a chunk.
    fn reply_header(&mut self, cookie: u64) -> io::Result<Result<u32, Chunk>> {
        self.near_deadline()?;
        let mut magic = [0; 4];
        self.recv(&mut magic)?;
        let magic = u32::from_be_bytes(magic);
        match magic {
            wire::SIMPLE_REPLY_MAGIC => {
                let mut b = [0; 12];
                self.recv(&mut b)?;
                let mut r = wire::Reader::new(&b);
                let (error, got) = (r.u32()?, r.u64()?);
                if got != cookie {
                    return Err(wire::invalid("a reply to a request never sent"));
                }
                Ok(Ok(error))
            }
            wire::STRUCTURED_REPLY_MAGIC if self.structured => {
                let mut b = [0; 16];
                self.recv(&mut b)?;
                let mut r = wire::Reader::new(&b);
                let c = Chunk {
                    flags: r.u16()?,
                    kind: r.u16()?,
                    cookie: r.u64()?,
                    length: r.u32()?,
                };
                if c.cookie != cookie {
                    return Err(wire::invalid("a reply to a request never sent"));
                }
                Ok(Err(c))
            }
            m => Err(wire::invalid(format!("a reply with magic {m:#x}"))),
        }
    }

    /// An error chunk's number and message.
    fn error_chunk(&mut self, c: &Chunk) -> io::Result<(u32, String)> {
        let b = self.recv_vec(c.length, 6 + wire::MAX_MESSAGE as u32 + 8)?;
        let mut r = wire::Reader::new(&b);
        let e = r.u32()?;
        let n = r.u16()? as usize;
        let msg = String::from_utf8_lossy(r.bytes(n)?).into_owned();
        Ok((e.max(1), msg))
    }

    /// A request whose reply carries no data.
    fn simple(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let cookie = self.send(kind, flags, offset, length, payload)?;
        let mut error = None;
        loop {
            match self.reply_header(cookie)? {
                Ok(e) => {
                    self.intact = true;
                    return if e == 0 {
                        Ok(())
                    } else {
                        Err(server_error(e, ""))
                    };
                }
                Err(c) if chunk::is_error(c.kind) => {
                    let (e, msg) = self.error_chunk(&c)?;
                    error.get_or_insert((e, msg));
                    if c.done() {
                        break;
                    }
                }
                Err(c) if c.kind == chunk::NONE && c.length == 0 && c.done() => break,
                Err(c) => {
                    return Err(wire::invalid(format!(
                        "an unexpected chunk of type {}",
                        c.kind
                    )));
                }
            }
        }
        self.intact = true;
        match error {
            None => Ok(()),
            Some((e, msg)) => Err(server_error(e, &msg)),
        }
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let cookie = self.send(cmd::READ, 0, offset, buf.len() as u32, &[])?;
        if !self.structured {
            return match self.reply_header(cookie)? {
                Ok(0) => {
                    self.recv(buf)?;
                    self.intact = true;
                    Ok(())
                }
                Ok(e) => {
                    self.intact = true;
                    Err(server_error(e, ""))
                }
                Err(_) => Err(wire::invalid("a chunk without structured replies")),
            };
        }
        // Chunks must cover the whole read, without overlap, before DONE.
        let mut covered = Covered::default();
        let mut error = None;
        loop {
            let c = match self.reply_header(cookie)? {
                Err(c) => c,
                Ok(_) => return Err(wire::invalid("a simple reply to a structured read")),
            };
            match c.kind {
                chunk::OFFSET_DATA => {
                    let mut at = [0; 8];
                    if c.length < 9 {
                        return Err(wire::invalid("a data chunk without data"));
                    }
                    self.recv(&mut at)?;
                    let at = u64::from_be_bytes(at);
                    let n = (c.length - 8) as u64;
                    covered.add(at, n)?;
                    let piece = piece_of(buf, offset, at, n)?;
                    self.recv(piece)?;
                }
                chunk::OFFSET_HOLE => {
                    if c.length != 12 {
                        return Err(wire::invalid("a hole chunk of the wrong size"));
                    }
                    let mut b = [0; 12];
                    self.recv(&mut b)?;
                    let at = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                    let n = u32::from_be_bytes(b[8..].try_into().expect("4 bytes")) as u64;
                    covered.add(at, n)?;
                    piece_of(buf, offset, at, n)?.fill(0);
                }
                chunk::NONE if c.length == 0 => {}
                k if chunk::is_error(k) => {
                    let (e, msg) = self.error_chunk(&c)?;
                    error.get_or_insert((e, msg));
                }
                k => return Err(wire::invalid(format!("an unexpected chunk of type {k}"))),
            }
            if c.done() {
                break;
            }
        }
        self.intact = true;
        match error {
            Some((e, msg)) => Err(server_error(e, &msg)),
            None if covered.bytes != buf.len() as u64 => {
                Err(wire::invalid("a read reply that left bytes out"))
            }
            None => Ok(()),
        }
    }

    /// The target's id for `program` on this connection, loading it there first if need
    /// be; `Ok(Err)` if the target refused it.
    fn program_id(&mut self, program: &Arc<RemoteProgram>) -> io::Result<Result<u64, String>> {
        if let Some((_, id)) = self.programs.get(&program.key) {
            return Ok(Ok(*id));
        }
        // Programs the daemon no longer has are unloaded before another is loaded.
        let gone: Vec<(u64, u64)> = self
            .programs
            .iter()
            .filter(|(_, (p, _))| p.strong_count() == 0)
            .map(|(k, (_, id))| (*k, *id))
            .collect();
        for (key, id) in gone {
            self.programs.remove(&key);
            match self.simple(cmd::NEARFS_UNLOAD, 0, id, 0, &[]) {
                // The target may have forgotten it already; that is what was asked.
                Err(e) if e.kind() == io::ErrorKind::Other && self.intact => {}
                r => r?,
            }
        }
        let payload = appcode_ext::encode_load(&program.name, &program.object);
        let cookie = self.send(cmd::NEARFS_LOAD, 0, 0, payload.len() as u32, &payload)?;
        let mut id = None;
        let mut error = None;
        loop {
            let c = match self.reply_header(cookie)? {
                Err(c) => c,
                Ok(e) => {
                    error.get_or_insert((e, String::new()));
                    break;
                }
            };
            match c.kind {
                chunk::NEARFS_PROGRAM if c.length == 8 => {
                    let mut b = [0; 8];
                    self.recv(&mut b)?;
                    id = Some(u64::from_be_bytes(b));
                }
                k if chunk::is_error(k) => {
                    let e = self.error_chunk(&c)?;
                    error.get_or_insert(e);
                }
                k => return Err(wire::invalid(format!("an unexpected chunk of type {k}"))),
            }
            if c.done() {
                break;
            }
        }
        self.intact = true;
        match (id, error) {
            (Some(id), None) => {
                self.programs
                    .insert(program.key, (Arc::downgrade(program), id));
                Ok(Ok(id))
            }
            (_, Some((_, msg))) => Ok(Err(msg)),
            (None, None) => Err(wire::invalid("a LOAD reply without a program")),
        }
    }

    /// Runs a loaded program; `None` if the target does not know it (any more).
    fn run(&mut self, request: &RunRequest) -> io::Result<Option<Result<Outcome, RunError>>> {
        let payload = request.encode();
        // The run's own time at the target comes on top of the network's.
        let time = self.timeout + request.limits.wall;
        let cookie =
            self.send_within(cmd::NEARFS_RUN, 0, 0, payload.len() as u32, &payload, time)?;
        let mut output = Vec::new();
        loop {
            let c = match self.reply_header(cookie)? {
                Err(c) => c,
                Ok(e) => {
                    self.intact = true;
                    return Ok(Some(Err(RunError::Io(format!(
                        "the target answered error {e}"
                    )))));
                }
            };
            match c.kind {
                chunk::NEARFS_OUTPUT => {
                    // A target gives no more output than the run was allowed: checked
                    // before anything is allocated for it.
                    let room = request
                        .limits
                        .output_bytes
                        .saturating_sub(output.len() as u64);
                    let most = (8 + room).min(wire::MAX_PAYLOAD as u64) as u32;
                    let b = self.recv_vec(c.length, most)?;
                    let mut r = wire::Reader::new(&b);
                    if r.u64()? != output.len() as u64 {
                        return Err(wire::invalid("output pieces out of order"));
                    }
                    output.extend_from_slice(r.rest());
                }
                chunk::NEARFS_RESULT if c.done() => {
                    let b = self.recv_vec(c.length, 64 + wire::MAX_MESSAGE as u32)?;
                    self.intact = true;
                    return appcode_ext::decode_result(&b, output).map(Some);
                }
                k if chunk::is_error(k) && c.done() => {
                    let (e, msg) = self.error_chunk(&c)?;
                    self.intact = true;
                    if e == errno::ENOENT {
                        // The target does not know the program: it is loaded again.
                        self.programs.retain(|_, (_, id)| *id != request.program);
                        return Ok(None);
                    }
                    return Ok(Some(Err(RunError::Io(format!(
                        "the target refused the run: {msg}"
                    )))));
                }
                k => return Err(wire::invalid(format!("an unexpected chunk of type {k}"))),
            }
        }
    }
}

/// The stretches of a read that its reply's chunks filled.
#[derive(Default)]
struct Covered {
    pieces: Vec<(u64, u64)>,
    bytes: u64,
}

impl Covered {
    /// Chunks a reply may be in: a server sends one, or few.
    const MAX: usize = 4096;

    /// Records `[at, at + n)`; a chunk over bytes another chunk filled is a broken reply
    /// (the caller would get some bytes twice and others never).
    fn add(&mut self, at: u64, n: u64) -> io::Result<()> {
        let end = at
            .checked_add(n)
            .ok_or_else(|| wire::invalid("a chunk past 2^64"))?;
        if n == 0
            || self.pieces.len() >= Covered::MAX
            || self.pieces.iter().any(|&(s, e)| at < e && s < end)
        {
            return Err(wire::invalid("empty, overlapping or too many chunks"));
        }
        self.pieces.push((at, end));
        self.bytes += n;
        Ok(())
    }
}

/// The part of `buf` (which holds the bytes at `base`) that a chunk for `[at, at + n)`
/// fills, if the chunk lies inside it.
fn piece_of(buf: &mut [u8], base: u64, at: u64, n: u64) -> io::Result<&mut [u8]> {
    let start = at.checked_sub(base).filter(|s| *s <= buf.len() as u64);
    match start {
        Some(s) if n <= buf.len() as u64 - s => Ok(&mut buf[s as usize..(s + n) as usize]),
        _ => Err(wire::invalid("a chunk outside the read")),
    }
}

/// The handshake from the client's side: fixed newstyle, structured replies, the appcode
/// extension if asked, then GO (or EXPORT_NAME with an old server). Returns the export's
/// size and flags, and what was negotiated.
fn negotiate(
    socket: &TcpStream,
    until: Instant,
    url: &NbdUrl,
    appcode: Option<u64>,
) -> io::Result<(u64, u16, bool, bool)> {
    // One deadline for the whole handshake, however the server spreads its replies.
    let mut s = socket;
    let r = &mut wire::Deadline {
        inner: socket,
        until,
    };
    if wire::read_u64(r)? != wire::NBDMAGIC || wire::read_u64(r)? != wire::IHAVEOPT {
        return Err(wire::invalid("not a newstyle NBD server"));
    }
    let server_flags = wire::read_u16(r)?;
    if server_flags & wire::handshake::FIXED_NEWSTYLE == 0 {
        return Err(wire::invalid("the server does not speak fixed newstyle"));
    }
    let no_zeroes = server_flags & wire::handshake::NO_ZEROES != 0;
    let mut client_flags = wire::handshake::C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= wire::handshake::C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())?;

    wire::write_option(&mut s, opt::STRUCTURED_REPLY, &[])?;
    let structured = option_reply(r, opt::STRUCTURED_REPLY)?.0 == rep::ACK;
    let mut extension = false;
    if let (Some(token), true) = (appcode, structured) {
        let mut b = Vec::new();
        b.put_u32(appcode_ext::VERSION);
        b.put_u64(token);
        wire::write_option(&mut s, opt::NEARFS_APPCODE, &b)?;
        let (kind, data) = option_reply(r, opt::NEARFS_APPCODE)?;
        match kind {
            rep::ACK => extension = true,
            rep::ERR_POLICY => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{url}: {}", String::from_utf8_lossy(&data)),
                ));
            }
            _ => {}
        }
    }

    let mut b = Vec::new();
    b.put_u32(url.export.len() as u32);
    b.extend_from_slice(url.export.as_bytes());
    b.put_u16(0);
    wire::write_option(&mut s, opt::GO, &b)?;
    let mut export = None;
    // A server sends a few INFO replies; one that never stops is broken.
    for _ in 0..MAX_INFO_REPLIES {
        let (kind, data) = option_reply(r, opt::GO)?;
        match kind {
            rep::INFO => {
                let mut r = wire::Reader::new(&data);
                if r.u16()? == wire::info::EXPORT {
                    export = Some((r.u64()?, r.u16()?));
                }
            }
            rep::ACK => {
                let (size, flags) =
                    export.ok_or_else(|| wire::invalid("GO without the export's size"))?;
                return Ok((size, flags, structured, extension));
            }
            rep::ERR_UNSUP => {
                // An old server: EXPORT_NAME, which has no error reply (it closes on a
                // bad name).
                wire::write_option(&mut s, opt::EXPORT_NAME, url.export.as_bytes())?;
                let size = wire::read_u64(r)?;
                let flags = wire::read_u16(r)?;
                if !no_zeroes {
                    wire::read_array::<124>(r)?;
                }
                return Ok((size, flags, structured, extension));
            }
            rep::ERR_UNKNOWN => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{url}: the server has no export {:?}", url.export),
                ));
            }
            k if rep::is_error(k) => {
                return Err(io::Error::other(format!(
                    "{url}: the server refused the export: {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            k => return Err(wire::invalid(format!("an option reply of type {k}"))),
        }
    }
    Err(wire::invalid("GO answered with endless INFO replies"))
}

/// Reads one option reply to `option`: its type and data.
fn option_reply(s: &mut impl Read, option: u32) -> io::Result<(u32, Vec<u8>)> {
    if wire::read_u64(s)? != wire::REPLY_MAGIC || wire::read_u32(s)? != option {
        return Err(wire::invalid("a malformed option reply"));
    }
    let kind = wire::read_u32(s)?;
    let len = wire::read_u32(s)?;
    let data = wire::read_vec(s, len, wire::MAX_OPTION)?;
    Ok((kind, data))
}
