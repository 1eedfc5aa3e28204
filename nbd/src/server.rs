//! `nearfs serve`: an NBD server for one export, and the storage target that runs appcode
//! next to it.
//!
//! Each connection is served by a few threads that take turns reading one request (header
//! and payload) off the socket, then handle it and send its reply under the writer's lock:
//! replies leave in the order requests finish, matched by cookie, as the protocol allows.
//! Nothing a client sends is trusted: lengths are checked before anything is allocated,
//! every payload in memory is drawn from one server-wide budget, a client that breaks the
//! protocol is disconnected, and what one connection loads and runs is its own (DESIGN.md,
//! invariant 7).

use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use appcode::{Limits, Mode, Program, Request as RunArgs, World};
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
    /// Threads serving each connection: at most this many of its requests are handled at
    /// once.
    pub threads: usize,
    pub max_connections: usize,
    /// Bytes of payloads (requests and replies) all connections together may hold.
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
    memory: Budget,
    loaders: Budget,
    /// The nearfs mount that owns the export: its token and how many connections it has.
    owner: Mutex<Option<(u64, usize)>>,
    /// Open connections, to close them when the server stops.
    connections: Mutex<HashMap<u64, TcpStream>>,
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
        for s in lock(&self.shared.connections).values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Server {
    pub fn bind(addr: impl ToSocketAddrs, export: Export, config: Config) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                memory: Budget::new(config.memory.max(wire::MAX_PAYLOAD as u64 * 2)),
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
            {
                let mut open = lock(&self.shared.connections);
                if open.len() >= self.shared.config.max_connections {
                    tracing::warn!(peer = ?stream.peer_addr().ok(), "too many connections; refused");
                    continue;
                }
                match stream.try_clone() {
                    Ok(s) => open.insert(id, s),
                    Err(_) => continue,
                };
            }
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    let peer = stream.peer_addr().ok();
                    tracing::debug!(id, ?peer, "connected");
                    if let Err(e) = serve_connection(&shared, stream) {
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

/// What a client chose in the handshake.
#[derive(Debug, Default)]
struct Negotiated {
    structured: bool,
    /// The owner token of a nearfs mount that negotiated the appcode extension.
    appcode: Option<u64>,
}

fn serve_connection(shared: &Arc<Shared>, mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    wire::keep_alive(&stream)?;
    stream.set_read_timeout(Some(shared.config.handshake_timeout))?;
    stream.set_write_timeout(Some(shared.config.handshake_timeout))?;
    let Some(negotiated) = handshake(shared, &mut stream)? else {
        return Ok(());
    };
    stream.set_read_timeout(None)?;
    // A client that stops reading its replies cannot hold a thread forever.
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let conn = Connection {
        shared: shared.clone(),
        reader: Mutex::new(BufReader::with_capacity(64 << 10, stream.try_clone()?)),
        writer: Mutex::new(stream.try_clone()?),
        socket: stream,
        negotiated,
        closing: AtomicBool::new(false),
        programs: Mutex::new(Programs::default()),
    };
    let result = std::thread::scope(|s| {
        for _ in 1..shared.config.threads.max(1) {
            s.spawn(|| conn.work());
        }
        conn.work()
    });
    if let Some(token) = conn.negotiated.appcode {
        let mut owner = lock(&shared.owner);
        if let Some((t, n)) = owner.as_mut()
            && *t == token
        {
            *n -= 1;
            if *n == 0 {
                *owner = None;
            }
        }
    }
    result
}

/// The handshake: fixed newstyle, then options until the client goes into transmission
/// (`Some`) or leaves (`None`).
fn handshake(shared: &Shared, s: &mut TcpStream) -> io::Result<Option<Negotiated>> {
    let mut hello = Vec::with_capacity(18);
    hello.put_u64(wire::NBDMAGIC);
    hello.put_u64(wire::IHAVEOPT);
    hello.put_u16(wire::handshake::FIXED_NEWSTYLE | wire::handshake::NO_ZEROES);
    s.write_all(&hello)?;
    let client_flags = wire::read_u32(s)?;
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
        if wire::read_u64(s)? != wire::IHAVEOPT {
            return Err(wire::invalid("an option without IHAVEOPT"));
        }
        let option = wire::read_u32(s)?;
        let len = wire::read_u32(s)?;
        // Past this the option cannot be skipped cheaply: the connection is closed.
        let data = wire::read_vec(s, len, wire::MAX_OPTION)?;
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
                if n.appcode.is_some() {
                    reply(s, rep::ERR_INVALID, b"already negotiated")?;
                    continue;
                }
                {
                    let mut owner = lock(&shared.owner);
                    match owner.as_mut() {
                        Some((t, _)) if *t != token => {
                            drop(owner);
                            reply(
                                s,
                                rep::ERR_POLICY,
                                b"the export is mounted by another nearfs; one mount owns an export at a time",
                            )?;
                            continue;
                        }
                        Some((_, count)) => *count += 1,
                        None => *owner = Some((token, 1)),
                    }
                }
                n.appcode = Some(token);
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
    shared: Arc<Shared>,
    reader: Mutex<BufReader<TcpStream>>,
    writer: Mutex<TcpStream>,
    socket: TcpStream,
    negotiated: Negotiated,
    closing: AtomicBool,
    programs: Mutex<Programs>,
}

/// What a request is answered with.
enum Reply {
    /// Success without data (a simple reply, or NONE when structured).
    Ok,
    Error(u32, String),
    /// A read's bytes, already behind room for the chunk header and offset.
    Data(Vec<u8>),
    /// Structured chunks, the last of which gets the DONE flag.
    Chunks(Vec<(u16, Vec<u8>)>),
}

/// Room in front of read data for a structured chunk header and its offset.
const DATA_HEADROOM: usize = wire::CHUNK_HEADER_SIZE + 8;

impl Connection {
    /// One of the connection's threads: reads a request, handles it, replies; until the
    /// client disconnects or breaks the protocol.
    fn work(&self) -> io::Result<()> {
        let result = (|| loop {
            let (req, payload, taken) = {
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
                    // Requests already read are finished by their threads; no more are read.
                    self.closing.store(true, Ordering::SeqCst);
                    return Ok(());
                }
                let payload_len = if req.has_payload() { req.length } else { 0 };
                let max = if req.kind == cmd::NEARFS_LOAD {
                    MAX_OBJECT + 2 + u16::MAX as u32
                } else {
                    wire::MAX_PAYLOAD
                };
                if payload_len > max {
                    // The payload is not read, so nothing after it can be: reply and close.
                    self.send(
                        &req,
                        Reply::Error(errno::EOVERFLOW, "payload too large".into()),
                    )?;
                    return Err(wire::invalid(format!("a payload of {payload_len} bytes")));
                }
                // Memory for the payload, or for a read's reply.
                let need = match req.kind {
                    cmd::READ => req.length.min(wire::MAX_PAYLOAD) as u64,
                    _ => payload_len as u64,
                };
                let taken = self.shared.memory.take(need);
                let payload = wire::read_vec(&mut *r, payload_len, max)?;
                (req, payload, taken)
            };
            let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.handle(&req, &payload)
            }))
            .unwrap_or_else(|_| {
                tracing::error!(kind = req.kind, "a request panicked");
                Reply::Error(errno::EIO, "internal error".into())
            });
            drop(payload);
            self.send(&req, reply)?;
            drop(taken);
        })();
        if result.is_err() || self.closing.load(Ordering::SeqCst) {
            // The other threads of this connection stop too.
            self.closing.store(true, Ordering::SeqCst);
            let _ = self.socket.shutdown(Shutdown::Read);
        }
        result
    }

    fn handle(&self, req: &Request, payload: &[u8]) -> Reply {
        let export = &self.shared.export;
        let dev = export.device.as_ref();
        if req.flags & !cmd_flag::KNOWN != 0 {
            return Reply::Error(
                errno::EINVAL,
                format!("unknown command flags {:#x}", req.flags),
            );
        }
        let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && export.read_only {
            return Reply::Error(errno::EPERM, "the export is read-only".into());
        }
        let inside = req
            .offset
            .checked_add(req.length as u64)
            .is_some_and(|end| end <= dev.len());
        let io_error = |e: io::Error| Reply::Error(errno::EIO, e.to_string());
        match req.kind {
            cmd::READ if req.length > wire::MAX_PAYLOAD => Reply::Error(
                errno::EOVERFLOW,
                format!("reads are at most {} bytes", wire::MAX_PAYLOAD),
            ),
            cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES if !inside => {
                let e = if writes { errno::ENOSPC } else { errno::EINVAL };
                Reply::Error(
                    e,
                    format!(
                        "[{}, +{}) is past the end of the export",
                        req.offset, req.length
                    ),
                )
            }
            cmd::READ => {
                let mut b = vec![0; DATA_HEADROOM + req.length as usize];
                match dev.read_at(&mut b[DATA_HEADROOM..], req.offset) {
                    Ok(()) => Reply::Data(b),
                    Err(e) => io_error(e),
                }
            }
            cmd::WRITE => {
                let r = dev
                    .write_at(payload, req.offset)
                    .and_then(|()| self.fua(req));
                r.map_or_else(io_error, |()| Reply::Ok)
            }
            cmd::FLUSH => dev.flush().map_or_else(io_error, |()| Reply::Ok),
            cmd::TRIM => dev
                .write_zeroes(req.offset, req.length as u64)
                .and_then(|()| self.fua(req))
                .map_or_else(io_error, |()| Reply::Ok),
            cmd::WRITE_ZEROES => {
                let r = if req.flags & cmd_flag::NO_HOLE != 0 {
                    write_zero_bytes(dev, req.offset, req.length as u64)
                } else {
                    dev.write_zeroes(req.offset, req.length as u64)
                };
                r.and_then(|()| self.fua(req))
                    .map_or_else(io_error, |()| Reply::Ok)
            }
            cmd::NEARFS_LOAD | cmd::NEARFS_RUN | cmd::NEARFS_UNLOAD
                if self.negotiated.appcode.is_none() =>
            {
                Reply::Error(
                    errno::EINVAL,
                    "the appcode extension was not negotiated".into(),
                )
            }
            cmd::NEARFS_LOAD => self.load(payload),
            cmd::NEARFS_RUN => self.run(payload),
            cmd::NEARFS_UNLOAD => match lock(&self.programs).by_id.remove(&req.offset) {
                Some(_) => Reply::Ok,
                None => Reply::Error(errno::ENOENT, "no such program".into()),
            },
            k => Reply::Error(errno::EINVAL, format!("unknown command {k}")),
        }
    }

    fn fua(&self, req: &Request) -> io::Result<()> {
        if req.flags & cmd_flag::FUA != 0 {
            self.shared.export.device.flush()?;
        }
        Ok(())
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
                let mut b = Vec::new();
                b.put_u64(id);
                Reply::Chunks(vec![(chunk::NEARFS_PROGRAM, b)])
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
        let mut outcome = program.run(
            world,
            &RunArgs {
                arg: &req.arg,
                limits,
            },
        );
        let mut chunks = Vec::new();
        if let Ok(o) = &mut outcome {
            for (i, piece) in o.output.chunks(OUTPUT_PIECE).enumerate() {
                let mut b = Vec::with_capacity(8 + piece.len());
                b.put_u64((i * OUTPUT_PIECE) as u64);
                b.extend_from_slice(piece);
                chunks.push((chunk::NEARFS_OUTPUT, b));
            }
        }
        chunks.push((chunk::NEARFS_RESULT, appcode_ext::encode_result(&outcome)));
        Reply::Chunks(chunks)
    }

    /// Sends a reply; one message (or one per chunk) under the writer's lock.
    fn send(&self, req: &Request, reply: Reply) -> io::Result<()> {
        let structured = self.negotiated.structured;
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
            Reply::Data(mut b) if structured => {
                let n = b.len() - DATA_HEADROOM;
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
                w.write_all(&b)
            }
            Reply::Data(mut b) => {
                let start = DATA_HEADROOM - wire::SIMPLE_REPLY_SIZE;
                b[start..DATA_HEADROOM].copy_from_slice(&wire::simple_reply(0, cookie));
                w.write_all(&b[start..])
            }
            Reply::Chunks(chunks) => {
                // Only extension commands answer with chunks, and they need structured
                // replies negotiated.
                let last = chunks.len() - 1;
                for (i, (kind, data)) in chunks.into_iter().enumerate() {
                    w.write_all(&header(kind, data.len(), i == last))?;
                    w.write_all(&data)?;
                }
                Ok(())
            }
        }
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
