//! Every byte nearfs puts on the wire, in one place: the NBD protocol as `doc/proto.md` of
//! the NetworkBlockDevice project specifies it (fixed newstyle handshake, simple and
//! structured replies), and the nearfs appcode extension (`docs/nbd.md`). All integers are
//! big-endian ("network byte order"), as the protocol requires.

use std::io::{self, Read, Write};

/// "NBDMAGIC": the first eight bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": follows NBDMAGIC in newstyle negotiation, and starts every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server) and client flags.
pub mod handshake {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const C_NO_ZEROES: u32 = 1 << 1;
}

/// Option numbers.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    /// The nearfs appcode extension ("NF" and 1): `docs/nbd.md`. The protocol reserves no
    /// range for extensions; a server that does not know it answers `ERR_UNSUP`.
    pub const NEARFS_APPCODE: u32 = 0x4e46_0001;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR | 1;
    pub const ERR_POLICY: u32 = ERR | 2;
    pub const ERR_INVALID: u32 = ERR | 3;
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    pub const ERR_TOO_BIG: u32 = ERR | 9;

    pub fn is_error(t: u32) -> bool {
        t & ERR != 0
    }
}

/// `NBD_INFO_*` types in `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod flag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const WRITE_ZEROES: u16 = 6;
    /// Extension commands ("N@" to "NC"): only after `opt::NEARFS_APPCODE`.
    pub const NEARFS_LOAD: u16 = 0x4e40;
    pub const NEARFS_RUN: u16 = 0x4e41;
    pub const NEARFS_UNLOAD: u16 = 0x4e42;
    pub const NEARFS_FENCE: u16 = 0x4e43;
}

/// Command flags.
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    /// The command flags the server knows; any other bit is `EINVAL`.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
    /// Extension chunks: the id of a loaded program; a piece of a run's output; a run's
    /// result and costs (the last chunk of a RUN's reply).
    pub const NEARFS_PROGRAM: u16 = 0x4e01;
    pub const NEARFS_OUTPUT: u16 = 0x4e02;
    pub const NEARFS_RESULT: u16 = 0x4e03;

    pub fn is_error(t: u16) -> bool {
        t & (1 << 15) != 0
    }
}

/// Error numbers on the wire (the protocol's own, equal to Linux's).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
    /// Not in the protocol's list; only in replies to extension commands: no such program
    /// on this connection.
    pub const ENOENT: u32 = 2;
}

/// Largest payload either side sends or accepts in one message: the protocol's default
/// maximum (2^25), which it says must not be taken for an attack.
pub const MAX_PAYLOAD: u32 = 1 << 25;
/// Largest option payload a server reads; options carry names and short lists.
pub const MAX_OPTION: u32 = 1 << 16;
/// Longest export name, as in the protocol's string limit.
pub const MAX_NAME: usize = 4096;
/// Longest message in an error chunk (the protocol's string limit).
pub const MAX_MESSAGE: usize = 4096;

/// Size of a request header and of a structured reply chunk header.
pub const REQUEST_SIZE: usize = 28;
pub const CHUNK_HEADER_SIZE: usize = 20;
pub const SIMPLE_REPLY_SIZE: usize = 16;

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0; REQUEST_SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a header; `None` if the magic is wrong (the stream cannot be trusted after).
    pub fn decode(b: &[u8; REQUEST_SIZE]) -> Option<Request> {
        let mut r = Reader::new(b);
        if r.u32().ok()? != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: r.u16().ok()?,
            kind: r.u16().ok()?,
            cookie: r.u64().ok()?,
            offset: r.u64().ok()?,
            length: r.u32().ok()?,
        })
    }

    /// Whether the request's `length` counts payload bytes that follow the header.
    pub fn has_payload(&self) -> bool {
        matches!(self.kind, cmd::WRITE | cmd::NEARFS_LOAD | cmd::NEARFS_RUN)
    }
}

/// A structured reply chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl Chunk {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_SIZE] {
        let mut b = [0; CHUNK_HEADER_SIZE];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn done(&self) -> bool {
        self.flags & chunk::FLAG_DONE != 0
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_SIZE] {
    let mut b = [0; SIMPLE_REPLY_SIZE];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Writes an option request.
pub fn write_option(w: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

/// Writes an option reply.
pub fn write_option_reply(
    w: &mut impl Write,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

/// Reads one big-endian integer of `N` bytes from a stream.
pub fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    read_array(r).map(u16::from_be_bytes)
}

pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    read_array(r).map(u32::from_be_bytes)
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    read_array(r).map(u64::from_be_bytes)
}

/// Reads `len` bytes, refusing more than `max` before allocating anything.
pub fn read_vec(r: &mut impl Read, len: u32, max: u32) -> io::Result<Vec<u8>> {
    if len > max {
        return Err(invalid(format!(
            "{len} bytes where at most {max} may follow"
        )));
    }
    let mut v = vec![0; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Turns on TCP keepalive so that a peer that vanished without closing (its machine lost
/// power, its network went away) is noticed within about a minute: 30 s idle, then 3
/// probes 10 s apart. A connection to such a peer would otherwise hold its threads, and
/// at the target its mount's claim on the export, for ever.
pub fn keep_alive(s: &std::net::TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = value;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local c_int; the
        // descriptor belongs to `s`, which outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Something read from a socket, whose read timeout [`Deadline`] sets.
pub trait OnSocket {
    fn socket(&self) -> &std::net::TcpStream;
}

impl OnSocket for &std::net::TcpStream {
    fn socket(&self) -> &std::net::TcpStream {
        self
    }
}

impl OnSocket for io::BufReader<std::net::TcpStream> {
    fn socket(&self) -> &std::net::TcpStream {
        self.get_ref()
    }
}

impl<T: OnSocket + ?Sized> OnSocket for &mut T {
    fn socket(&self) -> &std::net::TcpStream {
        (**self).socket()
    }
}

/// Reads against one deadline for all of it, however the peer spreads its bytes: each
/// read may wait only for what is left. For handshakes, which are short and rare (the
/// socket's timeout is set before every read).
pub struct Deadline<R> {
    pub inner: R,
    pub until: std::time::Instant,
}

impl<R: Read + OnSocket> Read for Deadline<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        self.inner.socket().set_read_timeout(Some(left))?;
        self.inner.read(buf)
    }
}

/// Whether bytes can be read from `s` without waiting: `Some(true)` if some are there,
/// `Some(false)` if none are yet, `None` if the peer closed or the socket failed. One
/// system call; nothing is consumed.
pub fn readable_now(s: &std::net::TcpStream) -> Option<bool> {
    use std::os::fd::AsRawFd;
    let mut b = 0u8;
    // SAFETY: recv writes at most 1 byte into `b`, which lives across the call; the
    // descriptor belongs to `s`. MSG_PEEK leaves the byte where it is and MSG_DONTWAIT
    // makes the call return at once.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        1 => Some(true),
        n if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock => Some(false),
        _ => None,
    }
}

pub fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Appends big-endian integers and length-prefixed strings to a message.
pub trait Put {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

/// Takes big-endian integers off a received payload; running past its end is an
/// `InvalidData` error, never a panic.
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }

    pub fn bytes(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if n > self.b.len() {
            return Err(invalid(format!(
                "message ends {} bytes early",
                n - self.b.len()
            )));
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    pub fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_be_bytes(
            self.bytes(2)?.try_into().expect("2 bytes"),
        ))
    }

    pub fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }

    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_round_trip_and_bad_magic_is_refused() {
        let r = Request {
            flags: cmd_flag::FUA,
            kind: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn a_reader_past_the_end_is_an_error() {
        let mut r = Reader::new(&[0, 1, 2]);
        assert_eq!(r.u16().unwrap(), 1);
        assert!(r.u16().is_err());
        assert_eq!(r.rest(), &[2]);
    }
}
