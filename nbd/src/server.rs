//! `nearfs serve`: an NBD server for one export, and the storage target that runs appcode
//! next to it.
//!
//! Each connection has a reader thread, which answers a lone request itself, and helpers
//! that take requests arriving together or taking long; replies are sent under the
//! writer's lock in the order requests finish, matched by cookie, as the protocol allows.
//! Nothing a client sends is trusted: lengths are checked before anything is allocated, no
//! read or write holds more than 1 MiB whatever its length (longer ones are streamed), the
//! extension's payloads draw on one server-wide budget, a client that breaks the protocol
//! is disconnected, and what one connection loads and runs is its own (DESIGN.md,
//! invariant 7). `NEARFS_FENCE` lets a mount make sure nothing it gave up on still runs.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use appcode::{Limits, Mode, Outcome, Program, Request as RunArgs, RunError, World};
use blockdev::BlockDevice;

use crate::appcode_ext::{self, RunRequest, truncated};
use crate::wire::{self, Chunk, Put, Request, chunk, cmd, cmd_flag, errno, flag, opt, rep};

/// What `nearfs serve` serves.
#[derive(Clone, Debug)]
pub struct Export {
    /// The name clients ask for; the empty name (the default export) always means this one.
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    pub read_only: bool,
}

/// How the server treats its clients.
#[derive(Clone, Debug)]
pub struct Config {
    /// Threads serving each connection (its reader and helpers): at most this many of its
    /// requests are handled at once.
    pub threads: usize,
    pub max_connections: usize,
    /// Bytes the extension's payloads, and what their runs may hold, take at most over all
    /// connections together.
    pub memory: u64,
    /// Whether the appcode extension is offered.
    pub appcode: bool,
    /// The most any run may use, whatever its client asks for.
    pub limits: Limits,
    /// Programs one connection may have loaded at once.
    pub programs_per_connection: usize,
    /// A client has this long to finish the handshake.
    pub handshake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            threads: 4,
            max_connections: 64,
            memory: 512 << 20,
            appcode: true,
            limits: Limits {
                output_bytes: 16 << 20,
                ..Limits::default()
            },
            programs_per_connection: 64,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Largest ELF object a LOAD may carry (as the daemon's LOAD).
pub const MAX_OBJECT: u32 = 4 << 20;
/// Pieces a run's output is sent in.
const OUTPUT_PIECE: usize = 1 << 20;
/// Option requests one handshake may make.
const MAX_OPTIONS: usize = 256;
/// Programs verified and compiled at once, over all connections.
const LOADERS: u64 = 2;

/// A count of something several threads draw from, waiting while there is not enough.
#[derive(Debug)]
struct Budget {
    left: Mutex<u64>,
    freed: Condvar,
    size: u64,
}

impl Budget {
    fn new(size: u64) -> Budget {
        Budget {
            left: Mutex::new(size),
            freed: Condvar::new(),
            size,
        }
    }

    /// Takes `n` (at most all of it), waiting until that much is free.
    fn take(&self, n: u64) -> Taken<'_> {
        let n = n.min(self.size);
        let mut left = lock(&self.left);
        while *left < n {
            left = self.freed.wait(left).unwrap_or_else(|p| p.into_inner());
        }
        *left -= n;
        Taken { budget: self, n }
    }
}

struct Taken<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        *lock(&self.budget.left) += self.n;
        self.budget.freed.notify_all();
    }
}

/// Locks a mutex; a thread that panicked while holding it left nothing half-done that
/// these locks guard (counters and sockets), so the poison is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State every connection shares.
#[derive(Debug)]
struct Shared {
    export: Export,
    config: Config,
    /// Memory for the extension's payloads and what their runs may hold.
    memory: Budget,
    loaders: Budget,
    /// The nearfs mount that owns the export: its token and how many claims it holds.
    owner: Mutex<Option<(u64, usize)>>,
    /// Open connections, to stop them with the server and to fence them.
    connections: Mutex<HashMap<u64, Arc<Connection>>>,
    next_connection: AtomicU64,
    stopping: AtomicBool,
}

/// A bound server; [`Server::serve`] accepts clients until [`Stopper::stop`].
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// Stops a server from another thread: no more clients, and open connections closed.
#[derive(Clone, Debug)]
pub struct Stopper {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Stopper {
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the accepting thread.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for c in lock(&self.shared.connections).values() {
            c.close();
        }
    }
}

impl Server {
    pub fn bind(addr: impl ToSocketAddrs, export: Export, config: Config) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                memory: Budget::new(config.memory.max(RUN_MEMORY + wire::MAX_PAYLOAD as u64)),
                loaders: Budget::new(LOADERS),
                export,
                config,
                owner: Mutex::new(None),
                connections: Mutex::new(HashMap::new()),
                next_connection: AtomicU64::new(1),
                stopping: AtomicBool::new(false),
            }),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn stopper(&self) -> io::Result<Stopper> {
        let mut addr = self.listener.local_addr()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Ok(Stopper {
            shared: self.shared.clone(),
            addr,
        })
    }

    /// Accepts clients, each on threads of its own, until stopped.
    pub fn serve(self) -> io::Result<()> {
        for stream in self.listener.incoming() {
            if self.shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: the server goes on.
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let id = self.shared.next_connection.fetch_add(1, Ordering::Relaxed);
            let conn = {
                let mut open = lock(&self.shared.connections);
                if open.len() >= self.shared.config.max_connections {
                    tracing::warn!(peer = ?stream.peer_addr().ok(), "too many connections; refused");
                    continue;
                }
                let Ok(conn) = Connection::new(id, &self.shared, stream) else {
                    continue;
                };
                let conn = Arc::new(conn);
                open.insert(id, conn.clone());
                conn
            };
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    let peer = conn.socket.peer_addr().ok();
                    tracing::debug!(id, ?peer, "connected");
                    if let Err(e) = conn.serve() {
                        tracing::debug!(id, ?peer, error = %e, "connection ended");
                    }
                    lock(&shared.connections).remove(&id);
                });
            if spawned.is_err() {
                lock(&self.shared.connections).remove(&id);
            }
        }
        Ok(())
    }
}

/// A mount's claim on the export, held by each connection that negotiated the extension
/// with its token; given back whichever way the connection ends.
#[derive(Debug)]
struct Claim {
    shared: Arc<Shared>,
    token: u64,
}

impl Claim {
    /// Claims the export for `token`, unless another mount holds it.
    fn take(shared: &Arc<Shared>, token: u64) -> Option<Claim> {
        let mut owner = lock(&shared.owner);
        match owner.as_mut() {
            Some((t, _)) if *t != token => return None,
            Some((_, count)) => *count += 1,
            None => *owner = Some((token, 1)),
        }
        Some(Claim {
            shared: shared.clone(),
            token,
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut owner = lock(&self.shared.owner);
        if let Some((t, n)) = owner.as_mut()
            && *t == self.token
        {
            *n -= 1;
            if *n == 0 {
                *owner = None;
            }
        }
    }
}

/// What a client chose in the handshake.
#[derive(Debug, Default)]
struct Negotiated {
    structured: bool,
    /// The claim of a nearfs mount that negotiated the appcode extension.
    claim: Option<Claim>,
}

/// The handshake: fixed newstyle, then options until the client goes into transmission
/// (`Some`) or leaves (`None`).
fn handshake(
    shared: &Arc<Shared>,
    r: &mut impl Read,
    s: &mut TcpStream,
) -> io::Result<Option<Negotiated>> {
    let mut hello = Vec::with_capacity(18);
    hello.put_u64(wire::NBDMAGIC);
    hello.put_u64(wire::IHAVEOPT);
    hello.put_u16(wire::handshake::FIXED_NEWSTYLE | wire::handshake::NO_ZEROES);
    s.write_all(&hello)?;
    let client_flags = wire::read_u32(r)?;
    let known = wire::handshake::C_FIXED_NEWSTYLE | wire::handshake::C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(wire::invalid(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & wire::handshake::C_NO_ZEROES != 0;
    let mut n = Negotiated::default();
    let export = &shared.export;
    for _ in 0..MAX_OPTIONS {
        if wire::read_u64(r)? != wire::IHAVEOPT {
            return Err(wire::invalid("an option without IHAVEOPT"));
        }
        let option = wire::read_u32(r)?;
        let len = wire::read_u32(r)?;
        // Past this the option cannot be skipped cheaply: the connection is closed.
        let data = wire::read_vec(r, len, wire::MAX_OPTION)?;
        let reply = |s: &mut TcpStream, kind: u32, data: &[u8]| {
            wire::write_option_reply(s, option, kind, data)
        };
        match option {
            opt::EXPORT_NAME => {
                if !names_export(export, &data) {
                    return Err(wire::invalid("EXPORT_NAME of an unknown export"));
                }
                let mut b = Vec::with_capacity(10 + 124);
                b.put_u64(export.device.len());
                b.put_u16(transmission_flags(export));
                if !no_zeroes {
                    b.resize(b.len() + 124, 0);
                }
                s.write_all(&b)?;
                return Ok(Some(n));
            }
            opt::ABORT => {
                reply(s, rep::ACK, &[])?;
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply(s, rep::ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let mut b = Vec::new();
                b.put_u32(export.name.len() as u32);
                b.extend_from_slice(export.name.as_bytes());
                reply(s, rep::SERVER, &b)?;
                reply(s, rep::ACK, &[])?;
            }
            opt::INFO | opt::GO => {
                let Some((name, requests)) = parse_info(&data) else {
                    reply(s, rep::ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                if !names_export(export, name) {
                    reply(s, rep::ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut b = Vec::new();
                b.put_u16(wire::info::EXPORT);
                b.put_u64(export.device.len());
                b.put_u16(transmission_flags(export));
                reply(s, rep::INFO, &b)?;
                // Block sizes are sent unasked: 1 byte, 4 KiB preferred, the payload limit.
                let mut b = Vec::new();
                b.put_u16(wire::info::BLOCK_SIZE);
                b.put_u32(1);
                b.put_u32(4096);
                b.put_u32(wire::MAX_PAYLOAD);
                reply(s, rep::INFO, &b)?;
                if requests.contains(&wire::info::NAME) {
                    let mut b = Vec::new();
                    b.put_u16(wire::info::NAME);
                    b.extend_from_slice(export.name.as_bytes());
                    reply(s, rep::INFO, &b)?;
                }
                if requests.contains(&wire::info::DESCRIPTION) {
                    let mut b = Vec::new();
                    b.put_u16(wire::info::DESCRIPTION);
                    b.extend_from_slice(b"nearfs storage target");
                    reply(s, rep::INFO, &b)?;
                }
                reply(s, rep::ACK, &[])?;
                if option == opt::GO {
                    return Ok(Some(n));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(s, rep::ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                n.structured = true;
                reply(s, rep::ACK, &[])?;
            }
            opt::NEARFS_APPCODE if shared.config.appcode => {
                let mut r = wire::Reader::new(&data);
                let (Ok(version), Ok(token), true) = (r.u32(), r.u64(), r.is_empty()) else {
                    reply(
                        s,
                        rep::ERR_INVALID,
                        b"NEARFS_APPCODE takes a version and a token",
                    )?;
                    continue;
                };
                if version != appcode_ext::VERSION {
                    reply(
                        s,
                        rep::ERR_UNSUP,
                        b"this target speaks version 1 of the extension",
                    )?;
                    continue;
                }
                if !n.structured {
                    reply(s, rep::ERR_INVALID, b"negotiate STRUCTURED_REPLY first")?;
                    continue;
                }
                if n.claim.is_some() {
                    reply(s, rep::ERR_INVALID, b"already negotiated")?;
                    continue;
                }
                let Some(claim) = Claim::take(shared, token) else {
                    reply(
                        s,
                        rep::ERR_POLICY,
                        b"the export is mounted by another nearfs; one mount owns an export at a time",
                    )?;
                    continue;
                };
                n.claim = Some(claim);
                reply(s, rep::ACK, &[])?;
            }
            _ => reply(s, rep::ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(wire::invalid("too many options"))
}

fn names_export(export: &Export, name: &[u8]) -> bool {
    name.is_empty() || name == export.name.as_bytes()
}

fn transmission_flags(export: &Export) -> u16 {
    let mut f = flag::HAS_FLAGS
        | flag::SEND_FLUSH
        | flag::SEND_FUA
        | flag::SEND_TRIM
        | flag::SEND_WRITE_ZEROES
        | flag::SEND_DF
        // Every connection writes the same device and a flush syncs all of it.
        | flag::CAN_MULTI_CONN;
    if export.read_only {
        f |= flag::READ_ONLY;
    }
    f
}

/// The name and information requests of INFO or GO.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut r = wire::Reader::new(data);
    let len = r.u32().ok()? as usize;
    let name = r.bytes(len).ok()?;
    let count = r.u16().ok()?;
    let requests = (0..count)
        .map(|_| r.u16().ok())
        .collect::<Option<Vec<_>>>()?;
    r.is_empty().then_some((name, requests))
}

/// Programs one connection loaded.
#[derive(Default)]
struct Programs {
    by_id: HashMap<u64, Arc<Program>>,
    next: u64,
}

struct Connection {
    id: u64,
    shared: Arc<Shared>,
    /// For closing it from anywhere.
    socket: TcpStream,
    reader: Mutex<BufReader<TcpStream>>,
    writer: Mutex<TcpStream>,
    /// Set once the handshake is done.
    negotiated: OnceLock<Negotiated>,
    closing: AtomicBool,
    /// Requests read and not yet answered; a fence waits for them.
    active: Mutex<usize>,
    idle: Condvar,
    programs: Mutex<Programs>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("id", &self.id).finish()
    }
}

/// What a request brought with it beyond its header.
enum Body<'a> {
    None,
    /// A write's bytes.
    Buffered(Vec<u8>),
    /// A long write, already streamed to the device piece by piece (or refused, its
    /// payload read and dropped).
    Streamed(Reply),
    /// An extension command's payload, with the memory it and its run may take.
    Extension(Vec<u8>, #[allow(dead_code)] Taken<'a>),
}

/// What a request is answered with.
enum Reply {
    /// Success without data (a simple reply, or NONE when structured).
    Ok,
    Error(u32, String),
    /// A short read: its bytes are in the thread's buffer, behind room for the header.
    Data,
    /// A long read: sent piece by piece from the device.
    Stream,
    Program(u64),
    Run(Result<Outcome, RunError>),
}

/// Room in front of read data for a structured chunk header and its offset.
const DATA_HEADROOM: usize = wire::CHUNK_HEADER_SIZE + 8;
/// Reads and writes longer than this are streamed in pieces of it, so that no request
/// holds more memory than this whatever its client does.
const PIECE: usize = 1 << 20;
/// What a RUN may hold beyond its payload: output and buffered writes, at the ceilings.
const RUN_MEMORY: u64 = 20 << 20;
/// Requests of one connection read and not yet answered, per thread serving it: past
/// this the reader waits, so a client that sends without reading its replies holds a
/// bounded number of payloads (each at most [`PIECE`] beyond the extension's budget).
const IN_FLIGHT_PER_THREAD: usize = 2;

impl Connection {
    fn new(id: u64, shared: &Arc<Shared>, socket: TcpStream) -> io::Result<Connection> {
        socket.set_nodelay(true)?;
        wire::keep_alive(&socket)?;
        // A client that stops reading its replies cannot hold a thread forever.
        socket.set_write_timeout(Some(Duration::from_secs(60)))?;
        Ok(Connection {
            id,
            shared: shared.clone(),
            reader: Mutex::new(BufReader::with_capacity(64 << 10, socket.try_clone()?)),
            writer: Mutex::new(socket.try_clone()?),
            socket,
            negotiated: OnceLock::new(),
            closing: AtomicBool::new(false),
            active: Mutex::new(0),
            idle: Condvar::new(),
            programs: Mutex::new(Programs::default()),
        })
    }

    /// The handshake, then requests on `threads` threads until the client leaves.
    fn serve(&self) -> io::Result<()> {
        let negotiated = {
            let mut r = lock(&self.reader);
            let mut w = lock(&self.writer);
            let mut deadline = wire::Deadline {
                inner: &mut *r,
                until: Instant::now() + self.shared.config.handshake_timeout,
            };
            let n = handshake(&self.shared, &mut deadline, &mut w)?;
            r.get_ref().set_read_timeout(None)?;
            n
        };
        let Some(negotiated) = negotiated else {
            return Ok(());
        };
        let _ = self.negotiated.set(negotiated);
        let helpers = self.shared.config.threads.max(1) - 1;
        let jobs = Jobs::default();
        std::thread::scope(|s| {
            for _ in 0..helpers {
                s.spawn(|| self.help(&jobs));
            }
            let r = self.read_requests(&jobs, helpers > 0);
            jobs.finish();
            r
        })
    }

    fn negotiated(&self) -> &Negotiated {
        self.negotiated
            .get()
            .expect("requests come after the handshake")
    }

    /// The token of the mount this connection belongs to, if it negotiated the extension.
    fn owner(&self) -> Option<u64> {
        self.negotiated.get()?.claim.as_ref().map(|c| c.token)
    }

    /// Stops reading requests; what was read is still answered if the socket lets it.
    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.socket.shutdown(Shutdown::Both);
        // A reader waiting for room stops waiting.
        self.idle.notify_all();
    }

    /// The connection's reader: reads requests until the client leaves or breaks the
    /// protocol. A request is answered right here unless another is already waiting behind
    /// it or it may take long (a flush, a run): then it goes to the connection's other
    /// threads and the reader reads on. A lone request thus costs no hand-over between
    /// threads, and requests in flight together are handled together.
    fn read_requests<'a>(&'a self, jobs: &Jobs<'a>, helped: bool) -> io::Result<()> {
        let mut buf = Vec::new();
        let most = IN_FLIGHT_PER_THREAD * self.shared.config.threads.max(1);
        let result = (|| {
            loop {
                {
                    let mut active = lock(&self.active);
                    while *active >= most && !self.closing.load(Ordering::SeqCst) {
                        active = self.idle.wait(active).unwrap_or_else(|p| p.into_inner());
                    }
                }
                let (req, body, more) = {
                    let mut r = lock(&self.reader);
                    if self.closing.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    let header = match wire::read_array::<{ wire::REQUEST_SIZE }>(&mut *r) {
                        Ok(h) => h,
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                        Err(e) => return Err(e),
                    };
                    let Some(req) = Request::decode(&header) else {
                        return Err(wire::invalid("a request with a bad magic"));
                    };
                    if req.kind == cmd::DISC {
                        // Requests already read are finished by their threads; no more are
                        // read.
                        self.closing.store(true, Ordering::SeqCst);
                        return Ok(());
                    }
                    let body = self.body(&mut r, &req, &mut buf)?;
                    // Counted before the reader is let go: a fence that got the reader
                    // after this sees it.
                    *lock(&self.active) += 1;
                    let more =
                        !r.buffer().is_empty() || wire::readable_now(r.get_ref()) == Some(true);
                    (req, body, more)
                };
                if helped && (more || slow(&req)) {
                    jobs.push(req, body);
                } else {
                    self.answer(&req, body, &mut buf)?;
                }
            }
        })();
        if result.is_err() || self.closing.load(Ordering::SeqCst) {
            // The other threads of this connection stop too; half a reply may be on the
            // wire, so nothing more is sent either.
            self.close();
        }
        result
    }

    /// One of the connection's other threads: answers what the reader hands over, until
    /// it stops and nothing is left.
    fn help<'a>(&'a self, jobs: &Jobs<'a>) {
        let mut buf = Vec::new();
        while let Some((req, body)) = jobs.pop() {
            if self.answer(&req, body, &mut buf).is_err() {
                self.close();
            }
        }
    }

    /// Handles a request that was read and sends its reply.
    fn answer(&self, req: &Request, body: Body<'_>, buf: &mut Vec<u8>) -> io::Result<()> {
        let reply =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(req, body, buf)))
                .unwrap_or_else(|_| {
                    tracing::error!(kind = req.kind, "a request panicked");
                    Reply::Error(errno::EIO, "internal error".into())
                });
        let sent = self.send(req, reply, buf);
        *lock(&self.active) -= 1;
        self.idle.notify_all();
        sent
    }

    /// Reads what follows a request's header. A long write goes to the device piece by
    /// piece as it arrives; an extension payload waits for memory first.
    fn body<'a>(
        &'a self,
        r: &mut BufReader<TcpStream>,
        req: &Request,
        buf: &mut Vec<u8>,
    ) -> io::Result<Body<'a>> {
        if !req.has_payload() {
            return Ok(Body::None);
        }
        let len = req.length as usize;
        let max = match req.kind {
            cmd::NEARFS_LOAD => MAX_OBJECT + 2 + u16::MAX as u32,
            _ => wire::MAX_PAYLOAD,
        };
        if req.length > max {
            // The payload is not read, so nothing after it can be: reply and close.
            self.send(
                req,
                Reply::Error(errno::EOVERFLOW, "payload too large".into()),
                buf,
            )?;
            return Err(wire::invalid(format!("a payload of {len} bytes")));
        }
        if req.kind != cmd::WRITE {
            // Only the mount that claimed the export may send these: anyone else would
            // draw on the memory the mount's runs need. The payload is not read, so the
            // connection ends.
            if self.owner().is_none() {
                self.send(
                    req,
                    Reply::Error(
                        errno::EINVAL,
                        "the appcode extension was not negotiated".into(),
                    ),
                    buf,
                )?;
                return Err(wire::invalid("an extension payload without the extension"));
            }
            let extra = if req.kind == cmd::NEARFS_RUN {
                RUN_MEMORY
            } else {
                0
            };
            let taken = self.shared.memory.take(len as u64 + extra);
            let payload = wire::read_vec(r, req.length, max)?;
            return Ok(Body::Extension(payload, taken));
        }
        if len <= PIECE {
            // Read into a vector of its own (the request may be answered by another
            // thread), without zeroing it first.
            let mut data = Vec::with_capacity(len);
            r.take(len as u64).read_to_end(&mut data)?;
            if data.len() < len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            return Ok(Body::Buffered(data));
        }
        if buf.len() < PIECE {
            buf.resize(PIECE, 0);
        }
        let mut outcome = self.refuse_write(req);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE);
            r.read_exact(&mut buf[..n])?;
            if outcome.is_none()
                && let Err(e) = self
                    .shared
                    .export
                    .device
                    .write_at(&buf[..n], req.offset + done as u64)
            {
                outcome = Some(Reply::Error(errno::EIO, e.to_string()));
            }
            done += n;
        }
        Ok(Body::Streamed(outcome.unwrap_or(Reply::Ok)))
    }

    /// Why a write-like request may not be done, if it may not.
    fn refuse_write(&self, req: &Request) -> Option<Reply> {
        let export = &self.shared.export;
        if export.read_only {
            return Some(Reply::Error(errno::EPERM, "the export is read-only".into()));
        }
        let inside = req
            .offset
            .checked_add(req.length as u64)
            .is_some_and(|end| end <= export.device.len());
        (!inside).then(|| {
            Reply::Error(
                errno::ENOSPC,
                format!(
                    "[{}, +{}) is past the end of the export",
                    req.offset, req.length
                ),
            )
        })
    }

    fn handle(&self, req: &Request, body: Body<'_>, buf: &mut Vec<u8>) -> Reply {
        let dev = self.shared.export.device.as_ref();
        if req.flags & !cmd_flag::KNOWN != 0 {
            return Reply::Error(
                errno::EINVAL,
                format!("unknown command flags {:#x}", req.flags),
            );
        }
        let io_error = |e: io::Error| Reply::Error(errno::EIO, e.to_string());
        let fua = |r: io::Result<()>| {
            r.and_then(|()| self.fua(req))
                .map_or_else(io_error, |()| Reply::Ok)
        };
        let extension = matches!(
            req.kind,
            cmd::NEARFS_LOAD | cmd::NEARFS_RUN | cmd::NEARFS_UNLOAD | cmd::NEARFS_FENCE
        );
        if extension && self.owner().is_none() {
            return Reply::Error(
                errno::EINVAL,
                "the appcode extension was not negotiated".into(),
            );
        }
        match (req.kind, body) {
            (cmd::READ, _) if req.length > wire::MAX_PAYLOAD => Reply::Error(
                errno::EOVERFLOW,
                format!("reads are at most {} bytes", wire::MAX_PAYLOAD),
            ),
            (cmd::READ, _)
                if req
                    .offset
                    .checked_add(req.length as u64)
                    .is_none_or(|end| end > dev.len()) =>
            {
                Reply::Error(
                    errno::EINVAL,
                    format!(
                        "[{}, +{}) is past the end of the export",
                        req.offset, req.length
                    ),
                )
            }
            (cmd::READ, _) if req.length as usize > PIECE => Reply::Stream,
            (cmd::READ, _) => {
                let n = DATA_HEADROOM + req.length as usize;
                if buf.len() < n {
                    buf.resize(n, 0);
                }
                match dev.read_at(&mut buf[DATA_HEADROOM..n], req.offset) {
                    Ok(()) => Reply::Data,
                    Err(e) => io_error(e),
                }
            }
            (cmd::WRITE, Body::Streamed(reply)) => match reply {
                Reply::Ok => fua(Ok(())),
                refused => refused,
            },
            (cmd::WRITE, Body::Buffered(data)) => match self.refuse_write(req) {
                Some(refused) => refused,
                None => fua(dev.write_at(&data, req.offset)),
            },
            (cmd::FLUSH, _) => dev.flush().map_or_else(io_error, |()| Reply::Ok),
            (cmd::TRIM | cmd::WRITE_ZEROES, _) => {
                if let Some(refused) = self.refuse_write(req) {
                    return refused;
                }
                let (at, len) = (req.offset, req.length as u64);
                fua(
                    if req.kind == cmd::WRITE_ZEROES && req.flags & cmd_flag::NO_HOLE != 0 {
                        write_zero_bytes(dev, at, len)
                    } else {
                        dev.write_zeroes(at, len)
                    },
                )
            }
            (cmd::NEARFS_LOAD, Body::Extension(payload, _)) => self.load(&payload),
            (cmd::NEARFS_RUN, Body::Extension(payload, _)) => self.run(&payload),
            (cmd::NEARFS_UNLOAD, _) => match lock(&self.programs).by_id.remove(&req.offset) {
                Some(_) => Reply::Ok,
                None => Reply::Error(errno::ENOENT, "no such program".into()),
            },
            (cmd::NEARFS_FENCE, _) => self.fence(),
            (k, _) => Reply::Error(errno::EINVAL, format!("unknown command {k}")),
        }
    }

    fn fua(&self, req: &Request) -> io::Result<()> {
        if req.flags & cmd_flag::FUA != 0 {
            self.shared.export.device.flush()?;
        }
        Ok(())
    }

    /// Closes every other connection of this connection's mount and waits until none of
    /// their requests is still being handled: after the reply, nothing a mount sent on a
    /// connection it gave up on can still change the export.
    fn fence(&self) -> Reply {
        let token = self.owner();
        let others: Vec<Arc<Connection>> = lock(&self.shared.connections)
            .values()
            .filter(|c| c.id != self.id && c.owner() == token)
            .cloned()
            .collect();
        for c in &others {
            c.close();
        }
        for c in &others {
            // Once the reader is free, every request of `c` that was read is counted in
            // `active`, and no more will be read.
            drop(lock(&c.reader));
            let mut active = lock(&c.active);
            while *active > 0 {
                active = c.idle.wait(active).unwrap_or_else(|p| p.into_inner());
            }
        }
        tracing::debug!(fenced = others.len(), "fence");
        Reply::Ok
    }

    /// Verifies and compiles a program for this connection: the target trusts no client's
    /// verifier.
    fn load(&self, payload: &[u8]) -> Reply {
        let (name, object) = match appcode_ext::decode_load(payload) {
            Ok(l) => l,
            Err(e) => return Reply::Error(errno::EINVAL, e.to_string()),
        };
        if lock(&self.programs).by_id.len() >= self.shared.config.programs_per_connection {
            return Reply::Error(errno::ENOSPC, "too many programs on this connection".into());
        }
        let program = {
            let _loader = self.shared.loaders.take(1);
            Program::from_elf(object, (!name.is_empty()).then_some(&name), Mode::Checked)
        };
        match program {
            Ok(p) => {
                let mut programs = lock(&self.programs);
                programs.next += 1;
                let id = programs.next;
                programs.by_id.insert(id, Arc::new(p));
                tracing::info!(id, name, "program loaded for a client");
                Reply::Program(id)
            }
            Err(e) => Reply::Error(errno::EINVAL, e.to_string()),
        }
    }

    /// Runs a program over the extents the request names, each inside the export.
    fn run(&self, payload: &[u8]) -> Reply {
        let export = &self.shared.export;
        let req = match RunRequest::decode(payload, export.device.len()) {
            Ok(r) => r,
            Err(e) => return Reply::Error(errno::EINVAL, e.to_string()),
        };
        if req.write && export.read_only {
            return Reply::Error(errno::EPERM, "the export is read-only".into());
        }
        let Some(program) = lock(&self.programs).by_id.get(&req.program).cloned() else {
            return Reply::Error(errno::ENOENT, "no such program on this connection".into());
        };
        let ceiling = &self.shared.config.limits;
        let limits = Limits {
            insns: req.limits.insns.min(ceiling.insns),
            hops: req.limits.hops.min(ceiling.hops),
            device_bytes: req.limits.device_bytes.min(ceiling.device_bytes),
            output_bytes: req.limits.output_bytes.min(ceiling.output_bytes),
            write_bytes: req.limits.write_bytes.min(ceiling.write_bytes),
            wall: req.limits.wall.min(ceiling.wall),
        };
        let world = World {
            device: export.device.as_ref(),
            extents: &req.extents,
            file_size: req.file_size,
            range: req.range.clone(),
            writable: req.write,
        };
        Reply::Run(program.run(
            world,
            &RunArgs {
                arg: &req.arg,
                limits,
            },
        ))
    }

    /// Sends a reply: one message (or one per chunk) under the writer's lock.
    fn send(&self, req: &Request, reply: Reply, buf: &mut Vec<u8>) -> io::Result<()> {
        let structured = self.negotiated().structured;
        let cookie = req.cookie;
        let header = |kind: u16, len: usize, done: bool| {
            Chunk {
                flags: if done { chunk::FLAG_DONE } else { 0 },
                kind,
                cookie,
                length: len as u32,
            }
            .encode()
        };
        let mut w = lock(&self.writer);
        match reply {
            Reply::Ok if structured && req.kind == cmd::READ => {
                w.write_all(&header(chunk::NONE, 0, true))
            }
            Reply::Ok => w.write_all(&wire::simple_reply(0, cookie)),
            Reply::Error(e, msg) if structured => {
                let msg = truncated(&msg, wire::MAX_MESSAGE);
                let mut b = Vec::with_capacity(wire::CHUNK_HEADER_SIZE + 6 + msg.len());
                b.extend_from_slice(&header(chunk::ERROR, 6 + msg.len(), true));
                b.put_u32(e);
                b.put_u16(msg.len() as u16);
                b.extend_from_slice(msg.as_bytes());
                w.write_all(&b)
            }
            Reply::Error(e, _) => w.write_all(&wire::simple_reply(e, cookie)),
            Reply::Data => {
                let n = req.length as usize;
                let b = &mut buf[..DATA_HEADROOM + n];
                if !structured {
                    let start = DATA_HEADROOM - wire::SIMPLE_REPLY_SIZE;
                    b[start..DATA_HEADROOM].copy_from_slice(&wire::simple_reply(0, cookie));
                    return w.write_all(&b[start..]);
                }
                if n == 0 {
                    return w.write_all(&header(chunk::NONE, 0, true));
                }
                b[..wire::CHUNK_HEADER_SIZE].copy_from_slice(&header(
                    chunk::OFFSET_DATA,
                    8 + n,
                    true,
                ));
                b[wire::CHUNK_HEADER_SIZE..DATA_HEADROOM]
                    .copy_from_slice(&req.offset.to_be_bytes());
                w.write_all(b)
            }
            Reply::Stream => {
                // The first piece is read before anything is sent, so that an error there
                // is still an ordinary error reply.
                let len = req.length as usize;
                let dev = self.shared.export.device.as_ref();
                if buf.len() < PIECE {
                    buf.resize(PIECE, 0);
                }
                if let Err(e) = dev.read_at(&mut buf[..PIECE], req.offset) {
                    drop(w);
                    return self.send(req, Reply::Error(errno::EIO, e.to_string()), buf);
                }
                if structured {
                    w.write_all(&header(chunk::OFFSET_DATA, 8 + len, true))?;
                    w.write_all(&req.offset.to_be_bytes())?;
                } else {
                    w.write_all(&wire::simple_reply(0, cookie))?;
                }
                w.write_all(&buf[..PIECE])?;
                let mut done = PIECE;
                while done < len {
                    let n = (len - done).min(PIECE);
                    // Past the header an error can only end the connection (the protocol
                    // says so for reads that fail half-way).
                    dev.read_at(&mut buf[..n], req.offset + done as u64)?;
                    w.write_all(&buf[..n])?;
                    done += n;
                }
                Ok(())
            }
            Reply::Program(id) => {
                let mut b = header(chunk::NEARFS_PROGRAM, 8, true).to_vec();
                b.put_u64(id);
                w.write_all(&b)
            }
            Reply::Run(outcome) => {
                if let Ok(o) = &outcome {
                    for (i, piece) in o.output.chunks(OUTPUT_PIECE).enumerate() {
                        w.write_all(&header(chunk::NEARFS_OUTPUT, 8 + piece.len(), false))?;
                        w.write_all(&((i * OUTPUT_PIECE) as u64).to_be_bytes())?;
                        w.write_all(piece)?;
                    }
                }
                let result = appcode_ext::encode_result(&outcome);
                let mut b = header(chunk::NEARFS_RESULT, result.len(), true).to_vec();
                b.extend_from_slice(&result);
                w.write_all(&b)
            }
        }
    }
}

/// Requests that may take long: the reader never waits for them. A RUN is not one of
/// them: only the mount that claimed the export sends RUNs, one at a time on a
/// connection, and its round trip is what offload saves; another thread would cost it a
/// hand-over.
fn slow(req: &Request) -> bool {
    match req.kind {
        cmd::READ | cmd::WRITE => req.length as usize > PIECE,
        cmd::NEARFS_RUN => false,
        _ => true,
    }
}

/// Requests the reader hands to the connection's other threads.
struct Jobs<'a> {
    list: Mutex<(VecDeque<(Request, Body<'a>)>, bool)>,
    ready: Condvar,
}

impl Default for Jobs<'_> {
    fn default() -> Self {
        Jobs {
            list: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        }
    }
}

impl<'a> Jobs<'a> {
    fn push(&self, req: Request, body: Body<'a>) {
        lock(&self.list).0.push_back((req, body));
        self.ready.notify_one();
    }

    /// The next request, waiting for one; `None` once the reader stopped and none is
    /// left.
    fn pop(&self) -> Option<(Request, Body<'a>)> {
        let mut list = lock(&self.list);
        loop {
            if let Some(job) = list.0.pop_front() {
                return Some(job);
            }
            if list.1 {
                return None;
            }
            list = self.ready.wait(list).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// No more requests come.
    fn finish(&self) {
        lock(&self.list).1 = true;
        self.ready.notify_all();
    }
}

/// Writes zeros as bytes (no hole punched), for `WRITE_ZEROES` with `NO_HOLE`.
fn write_zero_bytes(dev: &dyn BlockDevice, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (1u64 << 20).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (zeros.len() as u64).min(len - done);
        dev.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}
