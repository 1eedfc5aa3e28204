//! The client side of nearfs offload: load appcode into a mounted nearfs, run it on a
//! file's data, read its output. Applications link this crate; `nearfs prog` and
//! `nearfs run` are built on it. The wire format is in [`abi`].
//!
//! ```no_run
//! use std::fs::File;
//! let file = File::open("/mnt/near/tree.db")?;
//! let object = std::fs::read("btree.o")?;
//! let prog = nearfs_client::load(&file, &object, Some("btree_lookup"))?;
//! let out = nearfs_client::run(&file, &nearfs_client::Run::new(prog).arg(&42u64.to_le_bytes()))?;
//! println!("value {} after {} hops", out.result, out.costs.hops);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod abi;
pub mod layouts;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use abi::{Fields, FieldsMut, RunShape, cmd, off};

/// A loaded program's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProgId(pub u64);

/// What a run cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Costs {
    /// Instructions charged (the verified worst case of each invocation).
    pub insns: u64,
    pub hops: u64,
    pub device_bytes: u64,
    /// Bytes of output, all of which the client fetched.
    pub output_bytes: u64,
}

/// A finished run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub result: u64,
    pub output: Vec<u8>,
    pub costs: Costs,
}

/// A loaded program as `list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: ProgId,
    pub name: String,
    pub owner: u32,
    pub insns: u32,
    pub max_insns: u64,
}

/// Why a request failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The ioctl failed with this errno (ENOENT: no such program, EACCES/EPERM: not
    /// allowed, EBADF: the handle's open mode does not allow it, ...).
    Io(io::Error),
    /// The daemon speaks another ABI version.
    Version { daemon: u32, client: u32 },
    /// The verifier rejected the program; the log says where and why.
    Rejected { log: String },
    /// The run started and failed: a limit, a hop outside the range, a device error.
    /// Nothing it wrote was applied.
    RunFailed { kind: u32, errno: i32, costs: Costs },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Version { daemon, client } => write!(
                f,
                "the nearfs daemon speaks offload ABI version {daemon}, this client {client}; \
                 use a matching client"
            ),
            Error::Rejected { log } => write!(f, "the verifier rejected the program:\n{log}"),
            Error::RunFailed { kind, errno, .. } => {
                let what = match *kind {
                    abi::run_error::INSNS => "instruction limit reached",
                    abi::run_error::HOPS => "hop limit reached",
                    abi::run_error::DEVICE_BYTES => "device read limit reached",
                    abi::run_error::OUTPUT_BYTES => "output limit reached",
                    abi::run_error::TIMEOUT => "time limit reached",
                    abi::run_error::OUT_OF_RANGE => "hop to an offset outside the run's range",
                    abi::run_error::IO => "device error",
                    abi::run_error::ARG => "argument too large",
                    _ => "runtime fault",
                };
                write!(
                    f,
                    "the run failed: {what} ({})",
                    io::Error::from_raw_os_error(-errno)
                )
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Sends one request; `buf` is exactly the size `cmd` encodes.
fn ioctl(file: &File, cmd: u32, buf: &mut [u8]) -> io::Result<()> {
    debug_assert_eq!(buf.len(), ((cmd >> 16) & 0x3fff) as usize);
    // SAFETY: `buf` is valid for reads and writes of `_IOC_SIZE(cmd)` bytes, all the
    // kernel copies in either direction for a restricted FUSE ioctl.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), cmd as libc::c_ulong, buf.as_mut_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sends a request; an `EPROTO` reply is turned into a version error.
fn call(file: &File, cmd: u32, buf: &mut [u8]) -> Result<()> {
    match ioctl(file, cmd, buf) {
        Err(e) if e.raw_os_error() == Some(libc::EPROTO) => Err(Error::Version {
            daemon: version(file)?,
            client: abi::ABI_VERSION,
        }),
        r => Ok(r?),
    }
}

/// The ABI version the daemon agrees to: this client's, if the daemon speaks it, else 1
/// (any version of client may ask).
pub fn version(file: &File) -> Result<u32> {
    Ok(versions(file)?.0)
}

/// The version the daemon agrees to (see [`version`]), and every version it speaks (bit
/// `v` for version `v`).
pub fn versions(file: &File) -> Result<(u32, u32)> {
    let mut b = vec![0u8; cmd::VERSION_SIZE];
    b.put_u32(off::VERSION, abi::ABI_VERSION);
    ioctl(file, cmd::VERSION, &mut b)?;
    Ok((b.u32_at(off::VERSION), b.u32_at(off::FLAGS)))
}

/// Loads program `name` (or the object's only program) from an ELF object. `file` may be
/// any open file or directory of the mount.
pub fn load(file: &File, object: &[u8], name: Option<&str>) -> Result<ProgId> {
    let mut session = 0;
    let chunks: Vec<&[u8]> = if object.is_empty() {
        vec![&[][..]]
    } else {
        object.chunks(abi::LOAD_CHUNK).collect()
    };
    for (k, chunk) in chunks.iter().enumerate() {
        let last = k + 1 == chunks.len();
        let mut b = abi::request(cmd::LOAD_SIZE, if last { abi::LOAD_LAST } else { 0 });
        b.put_u64(off::load::SESSION, session);
        b.put_u64(off::load::OFFSET, (k * abi::LOAD_CHUNK) as u64);
        b.put_u32(off::load::LEN, chunk.len() as u32);
        b.put_str(off::load::NAME, abi::NAME_SIZE, name.unwrap_or(""));
        b[off::load::DATA..off::load::DATA + chunk.len()].copy_from_slice(chunk);
        call(file, cmd::LOAD, &mut b)?;
        session = b.u64_at(off::load::SESSION);
        let status = b.i32_at(off::load::STATUS);
        if status != 0 {
            if b.u32_at(off::load::LOG_LEN) > 0 {
                return Err(Error::Rejected {
                    log: fetch_log(file, session)?,
                });
            }
            return Err(Error::Io(io::Error::from_raw_os_error(-status)));
        }
        if last {
            return Ok(ProgId(b.u64_at(off::load::PROG_ID)));
        }
    }
    unreachable!("the last chunk returns")
}

fn fetch_log(file: &File, session: u64) -> Result<String> {
    let mut log = Vec::new();
    loop {
        let mut b = abi::request(cmd::LOG_SIZE, 0);
        b.put_u64(off::log::SESSION, session);
        b.put_u64(off::log::OFFSET, log.len() as u64);
        call(file, cmd::LOG, &mut b)?;
        let len = b.u32_at(off::log::LEN) as usize;
        log.extend_from_slice(&b[off::log::TEXT..off::log::TEXT + len.min(abi::LOG_CHUNK)]);
        if len == 0 || log.len() >= b.u32_at(off::log::TOTAL) as usize {
            return Ok(String::from_utf8_lossy(&log).into_owned());
        }
    }
}

/// Unloads a program; runs already going finish.
pub fn unload(file: &File, prog: ProgId) -> Result<()> {
    let mut b = abi::request(cmd::UNLOAD_SIZE, 0);
    b.put_u64(off::unload::PROG_ID, prog.0);
    call(file, cmd::UNLOAD, &mut b)
}

/// Every loaded program.
pub fn list(file: &File) -> Result<Vec<ProgInfo>> {
    let mut out = Vec::new();
    let mut cursor = 0;
    loop {
        let mut b = abi::request(cmd::LIST_SIZE, 0);
        b.put_u64(off::list::CURSOR, cursor);
        call(file, cmd::LIST, &mut b)?;
        let count = (b.u32_at(off::list::COUNT) as usize).min(abi::LIST_ENTRIES);
        for i in 0..count {
            let e = &b[off::list::ENTRIES + i * cmd::LIST_ENTRY_SIZE..][..cmd::LIST_ENTRY_SIZE];
            out.push(ProgInfo {
                id: ProgId(e.u64_at(off::list::E_ID)),
                owner: e.u32_at(off::list::E_OWNER),
                insns: e.u32_at(off::list::E_INSNS),
                max_insns: e.u64_at(off::list::E_MAX_INSNS),
                name: e.str_at(off::list::E_NAME, abi::NAME_SIZE),
            });
        }
        cursor = b.u64_at(off::list::NEXT);
        if cursor == 0 {
            return Ok(out);
        }
    }
}

/// A run to ask for.
#[derive(Clone, Debug)]
pub struct Run<'a> {
    pub prog: ProgId,
    pub range_off: u64,
    /// `abi::RANGE_TO_END` for the rest of the file.
    pub range_len: u64,
    pub arg: &'a [u8],
    pub write: bool,
    /// Output bytes the caller expects: more than fit a small RUN's reply and the run goes
    /// in the large struct, whose reply holds 8 KiB.
    pub expect_output: usize,
}

impl<'a> Run<'a> {
    /// The whole file, no argument, read-only.
    pub fn new(prog: ProgId) -> Run<'a> {
        Run {
            prog,
            range_off: 0,
            range_len: abi::RANGE_TO_END,
            arg: &[],
            write: false,
            expect_output: 0,
        }
    }

    pub fn range(mut self, off: u64, len: u64) -> Self {
        self.range_off = off;
        self.range_len = len;
        self
    }

    pub fn arg(mut self, arg: &'a [u8]) -> Self {
        self.arg = arg;
        self
    }

    pub fn write(mut self, write: bool) -> Self {
        self.write = write;
        self
    }

    pub fn expect_output(mut self, bytes: usize) -> Self {
        self.expect_output = bytes;
        self
    }

    /// The smallest struct that carries the argument and the expected output.
    fn shape(&self) -> RunShape {
        if self.arg.len() <= RunShape::SMALL.arg && self.expect_output <= RunShape::SMALL.out {
            RunShape::SMALL
        } else {
            RunShape::LARGE
        }
    }
}

/// Runs a program over `file` (opened for reading; also for writing if `run.write`),
/// fetching all of its output. The request goes in the smallest struct that carries it
/// ([`RunShape`]), and again in the large one when the small one is not enough:
/// - a daemon of ABI version 1 has no small struct (`ENOTTY`);
/// - output past the small reply is held for `MORE` within the user's limits; a reading
///   run whose output found no room there (which 8 KiB inline would not have needed)
///   changed nothing and is run again.
pub fn run(file: &File, run: &Run<'_>) -> Result<Output> {
    if run.arg.len() > abi::ARG_SIZE {
        return Err(Error::Io(io::Error::from_raw_os_error(libc::E2BIG)));
    }
    let shape = run.shape();
    if shape == RunShape::LARGE {
        return run_as(file, run, shape);
    }
    match run_as(file, run, shape) {
        Err(Error::Io(e)) if e.raw_os_error() == Some(libc::ENOTTY) => {
            run_as(file, run, RunShape::LARGE)
        }
        Err(Error::RunFailed { kind, .. })
            if kind == abi::run_error::OUTPUT_BYTES && !run.write =>
        {
            run_as(file, run, RunShape::LARGE)
        }
        r => r,
    }
}

fn run_as(file: &File, run: &Run<'_>, shape: RunShape) -> Result<Output> {
    let mut b = shape.request(if run.write { abi::RUN_WRITE } else { 0 });
    b.put_u64(off::run::PROG_ID, run.prog.0);
    b.put_u64(off::run::RANGE_OFF, run.range_off);
    b.put_u64(off::run::RANGE_LEN, run.range_len);
    b.put_u32(off::run::ARG_LEN, run.arg.len() as u32);
    b[off::run::ARG..off::run::ARG + run.arg.len()].copy_from_slice(run.arg);
    call(file, shape.cmd, &mut b)?;
    let costs = Costs {
        insns: b.u64_at(off::run::INSNS),
        hops: b.u64_at(off::run::HOPS),
        device_bytes: b.u64_at(off::run::DEVICE_BYTES),
        output_bytes: b.u64_at(off::run::OUTPUT_BYTES),
    };
    let status = b.i32_at(off::run::STATUS);
    if status != 0 {
        return Err(Error::RunFailed {
            kind: b.u32_at(off::run::RUN_ERROR),
            errno: status,
            costs,
        });
    }
    let len = (b.u32_at(off::run::OUT_LEN) as usize).min(shape.out);
    let mut output = b[shape.out_at()..shape.out_at() + len].to_vec();
    let token = b.u64_at(off::run::MORE);
    while token != 0 && (output.len() as u64) < costs.output_bytes {
        let mut m = abi::request(cmd::MORE_SIZE, 0);
        m.put_u64(off::more::TOKEN, token);
        call(file, cmd::MORE, &mut m)?;
        let len = (m.u32_at(off::more::LEN) as usize).min(abi::OUT_CHUNK);
        if len == 0 {
            break;
        }
        output.extend_from_slice(&m[off::more::OUT..off::more::OUT + len]);
    }
    Ok(Output {
        result: b.u64_at(off::run::RESULT),
        output,
        costs,
    })
}
