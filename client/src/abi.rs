//! The offload ioctl ABI: command numbers and the fixed-size, little-endian structs they
//! carry, with named offsets. Mirrored by `bpf-progs/include/nearfs.h`; `docs/abi.md`
//! describes it. FUSE passes ioctls on regular files in restricted mode: the kernel
//! copies exactly `_IOC_SIZE(cmd)` bytes each way and follows no pointers, so every
//! request is one self-contained struct, and big objects and outputs move in chunks.
//!
//! Errors that need no data back are the ioctl's errno. Outcomes that carry data (a
//! verifier rejection with its log, a run that hit a limit) complete the ioctl and say
//! so in the struct's `status` field, because the kernel copies nothing back from a
//! failed ioctl.

/// Bumped whenever a struct or meaning changes. A request carries a version the daemon
/// speaks, no older than its struct; the daemon serves every version in [`VERSIONS`] and
/// refuses others with `EPROTO`. `VERSION` agrees on one (see [`cmd::VERSION`]).
///
/// Version 2 added `RUN_SMALL`; every struct of version 1 is unchanged.
pub const ABI_VERSION: u32 = 2;
/// The versions this side speaks, bit `v` for version `v` (`VERSION`'s reply `flags`).
pub const VERSIONS: u32 = 1 << 1 | 1 << 2;

/// Object bytes per `LOAD` chunk.
pub const LOAD_CHUNK: usize = 8192;
/// Log bytes per `LOG` reply.
pub const LOG_CHUNK: usize = 8192;
/// Output bytes per `RUN` or `MORE` reply.
pub const OUT_CHUNK: usize = 8192;
/// Largest argument blob (appcode's `NEARFS_ARG_SIZE`).
pub const ARG_SIZE: usize = 1024;
/// Argument and output bytes inline in `RUN_SMALL`: a lookup's key and answer.
pub const SMALL_ARG: usize = 64;
pub const SMALL_OUT: usize = 64;
/// Programs per `LIST` reply.
pub const LIST_ENTRIES: usize = 32;
/// Bytes of a program name, NUL-padded.
pub const NAME_SIZE: usize = 64;
/// `range_len` meaning "to the end of the file".
pub const RANGE_TO_END: u64 = u64::MAX;

/// Where a `RUN`'s range `off`, `len` ends in a file of `size` bytes; `None` if it wraps.
pub fn range_end(off: u64, len: u64, size: u64) -> Option<u64> {
    if len == RANGE_TO_END {
        Some(size.max(off))
    } else {
        off.checked_add(len)
    }
}

/// `flags` of `LOAD`: this chunk is the last; verify and register the program.
pub const LOAD_LAST: u32 = 1;
/// `flags` of `RUN`: the program may write the file (needs a writable handle).
pub const RUN_WRITE: u32 = 1;

/// `run_error` of a run that failed: which limit or fault ended it.
pub mod run_error {
    pub const NONE: u32 = 0;
    pub const INSNS: u32 = 1;
    pub const HOPS: u32 = 2;
    pub const DEVICE_BYTES: u32 = 3;
    pub const OUTPUT_BYTES: u32 = 4;
    pub const TIMEOUT: u32 = 5;
    pub const OUT_OF_RANGE: u32 = 6;
    pub const IO: u32 = 7;
    /// The engine stopped the program, for executing what the verifier never reached.
    pub const FAULT: u32 = 8;
    pub const ARG: u32 = 9;
    /// The engine refused a memory access outside the program's memory (only a verifier
    /// bug lets a program get that far).
    pub const ACCESS: u32 = 10;
    /// The run buffered more writes than its limit.
    pub const WRITE_BYTES: u32 = 11;
}

/// `_IOWR('N', nr, size)` as Linux encodes it.
pub const fn iowr(nr: u32, size: usize) -> u32 {
    const READ_WRITE: u32 = 3;
    (READ_WRITE << 30) | ((size as u32) << 16) | ((b'N' as u32) << 8) | nr
}

/// Struct sizes and command numbers.
pub mod cmd {
    use super::*;

    pub const VERSION_SIZE: usize = 8;
    pub const LOAD_SIZE: usize = 112 + LOAD_CHUNK;
    pub const LOG_SIZE: usize = 32 + LOG_CHUNK;
    pub const UNLOAD_SIZE: usize = 16;
    pub const LIST_SIZE: usize = 32 + LIST_ENTRIES * LIST_ENTRY_SIZE;
    pub const LIST_ENTRY_SIZE: usize = 24 + NAME_SIZE;
    pub const RUN_SIZE: usize = 96 + ARG_SIZE + OUT_CHUNK;
    pub const RUN_SMALL_SIZE: usize = 96 + SMALL_ARG + SMALL_OUT;
    pub const MORE_SIZE: usize = 24 + OUT_CHUNK;

    /// In: `version` = the newest version the client speaks. Out: `version` = that version
    /// if the daemon speaks it, else 1 (what version-1 clients, told it was an output
    /// only, expect whatever they left there); `flags` = [`VERSIONS`] of the daemon.
    pub const VERSION: u32 = iowr(1, VERSION_SIZE);
    pub const LOAD: u32 = iowr(2, LOAD_SIZE);
    pub const LOG: u32 = iowr(3, LOG_SIZE);
    pub const UNLOAD: u32 = iowr(4, UNLOAD_SIZE);
    pub const LIST: u32 = iowr(5, LIST_SIZE);
    pub const RUN: u32 = iowr(6, RUN_SIZE);
    pub const MORE: u32 = iowr(7, MORE_SIZE);
    /// Version 2: `RUN` with [`SMALL_ARG`] argument and [`SMALL_OUT`] output bytes inline.
    pub const RUN_SMALL: u32 = iowr(8, RUN_SMALL_SIZE);
}

/// The two sizes of `struct nearfs_run`: the same fields, with inline argument and output
/// of different lengths. Output past the inline part comes back with `MORE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunShape {
    pub cmd: u32,
    pub size: usize,
    /// Largest argument.
    pub arg: usize,
    /// Output bytes in the reply itself.
    pub out: usize,
    /// The oldest ABI version that has it.
    pub since: u32,
}

impl RunShape {
    /// `nearfs_run` (version 1): up to 1 KiB of argument, 8 KiB of output inline.
    pub const LARGE: RunShape = RunShape {
        cmd: cmd::RUN,
        size: cmd::RUN_SIZE,
        arg: ARG_SIZE,
        out: OUT_CHUNK,
        since: 1,
    };
    /// `nearfs_run_small` (version 2): what a lookup needs, 224 bytes each way.
    pub const SMALL: RunShape = RunShape {
        cmd: cmd::RUN_SMALL,
        size: cmd::RUN_SMALL_SIZE,
        arg: SMALL_ARG,
        out: SMALL_OUT,
        since: 2,
    };

    /// Where the inline output starts.
    pub const fn out_at(self) -> usize {
        off::run::ARG + self.arg
    }

    /// A zeroed request of this shape, with the version that brought it.
    pub fn request(self, flags: u32) -> Vec<u8> {
        versioned(self.size, flags, self.since)
    }

    /// The shape of a RUN command, if it is one.
    pub fn of(command: u32) -> Option<RunShape> {
        [RunShape::LARGE, RunShape::SMALL]
            .into_iter()
            .find(|s| s.cmd == command)
    }
}

/// Field offsets. Every struct starts with `u32 version; u32 flags;`.
pub mod off {
    pub const VERSION: usize = 0;
    pub const FLAGS: usize = 4;

    /// `struct nearfs_load`
    pub mod load {
        pub const SESSION: usize = 8; // u64 in/out: 0 on the first chunk
        pub const OFFSET: usize = 16; // u64 in: where this chunk goes in the object
        pub const LEN: usize = 24; // u32 in: bytes of data used
        pub const STATUS: usize = 28; // i32 out: 0, or -errno (-EINVAL: rejected, see the log)
        pub const PROG_ID: usize = 32; // u64 out: the program, after the last chunk
        pub const LOG_LEN: usize = 40; // u32 out: bytes of verifier log to fetch with LOG
        pub const NAME: usize = 48; // char[64] in: program NAME of nearfs/NAME, or empty
        pub const DATA: usize = 112; // u8[LOAD_CHUNK] in
    }

    /// `struct nearfs_log`
    pub mod log {
        pub const SESSION: usize = 8; // u64 in: the load session that was rejected
        pub const OFFSET: usize = 16; // u64 in: where to read the log from
        pub const LEN: usize = 24; // u32 out: bytes in text
        pub const TOTAL: usize = 28; // u32 out: bytes of the whole log
        pub const TEXT: usize = 32; // char[LOG_CHUNK] out
    }

    /// `struct nearfs_unload`
    pub mod unload {
        pub const PROG_ID: usize = 8; // u64 in
    }

    /// `struct nearfs_list`
    pub mod list {
        pub const CURSOR: usize = 8; // u64 in: 0, then `next`
        pub const NEXT: usize = 16; // u64 out: cursor for the next call, 0 at the end
        pub const COUNT: usize = 24; // u32 out: entries filled
        pub const ENTRIES: usize = 32;
        /// `struct nearfs_prog_info`, at ENTRIES + i * LIST_ENTRY_SIZE
        pub const E_ID: usize = 0; // u64
        pub const E_OWNER: usize = 8; // u32 uid
        pub const E_INSNS: usize = 12; // u32
        pub const E_MAX_INSNS: usize = 16; // u64 worst case per invocation
        pub const E_NAME: usize = 24; // char[64]
    }

    /// `struct nearfs_run` and `struct nearfs_run_small` (`RunShape`): the same fields,
    /// up to `ARG`; the inline output follows the argument (`RunShape::out_at`).
    pub mod run {
        pub const PROG_ID: usize = 8; // u64 in
        pub const RANGE_OFF: usize = 16; // u64 in
        pub const RANGE_LEN: usize = 24; // u64 in (RANGE_TO_END: to the end of the file)
        pub const ARG_LEN: usize = 32; // u32 in
        pub const OUT_LEN: usize = 36; // u32 out: bytes in out
        pub const STATUS: usize = 40; // i32 out: 0, or -errno of a failed run
        pub const RUN_ERROR: usize = 44; // u32 out: run_error::*
        pub const RESULT: usize = 48; // u64 out: r0
        pub const INSNS: usize = 56; // u64 out: costs
        pub const HOPS: usize = 64;
        pub const DEVICE_BYTES: usize = 72;
        pub const OUTPUT_BYTES: usize = 80; // all output, also what is left for MORE
        pub const MORE: usize = 88; // u64 out: token for MORE, 0 if out holds everything
        pub const ARG: usize = 96; // u8[shape.arg] in
    }

    /// `struct nearfs_more`
    pub mod more {
        pub const TOKEN: usize = 8; // u64 in
        pub const LEN: usize = 16; // u32 out: bytes in out
        pub const LEFT: usize = 20; // u32 out: bytes still waiting after these (saturated)
        pub const OUT: usize = 24; // u8[OUT_CHUNK] out
    }
}

/// Little-endian field access on a request or reply buffer. Out-of-range offsets are a
/// bug in this module, not input, and panic.
pub trait Fields {
    fn u32_at(&self, at: usize) -> u32;
    fn u64_at(&self, at: usize) -> u64;
    fn i32_at(&self, at: usize) -> i32 {
        self.u32_at(at) as i32
    }
    /// A NUL-padded string field.
    fn str_at(&self, at: usize, len: usize) -> String;
}

pub trait FieldsMut {
    fn put_u32(&mut self, at: usize, v: u32);
    fn put_u64(&mut self, at: usize, v: u64);
    fn put_i32(&mut self, at: usize, v: i32) {
        self.put_u32(at, v as u32);
    }
    /// Writes `s` NUL-padded into `len` bytes (truncated to `len - 1`).
    fn put_str(&mut self, at: usize, len: usize, s: &str);
}

impl Fields for [u8] {
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self[at..at + 4].try_into().unwrap())
    }
    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self[at..at + 8].try_into().unwrap())
    }
    fn str_at(&self, at: usize, len: usize) -> String {
        let field = &self[at..at + len];
        let end = field.iter().position(|&b| b == 0).unwrap_or(len);
        String::from_utf8_lossy(&field[..end]).into_owned()
    }
}

impl FieldsMut for [u8] {
    fn put_u32(&mut self, at: usize, v: u32) {
        self[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, at: usize, v: u64) {
        self[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn put_str(&mut self, at: usize, len: usize, s: &str) {
        let field = &mut self[at..at + len];
        field.fill(0);
        let n = s.len().min(len - 1);
        field[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
}

/// A zeroed request of `size` bytes, for a struct version 1 has, with that version
/// filled in: a request says the oldest version that has its struct, so that this client
/// works with every daemon that has it (see [`ABI_VERSION`]).
pub fn request(size: usize, flags: u32) -> Vec<u8> {
    versioned(size, flags, 1)
}

fn versioned(size: usize, flags: u32, version: u32) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b.put_u32(off::VERSION, version);
    b.put_u32(off::FLAGS, flags);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_fit_a_restricted_ioctl_and_fields_do_not_overlap() {
        for size in [
            cmd::VERSION_SIZE,
            cmd::LOAD_SIZE,
            cmd::LOG_SIZE,
            cmd::UNLOAD_SIZE,
            cmd::LIST_SIZE,
            cmd::RUN_SIZE,
            cmd::RUN_SMALL_SIZE,
            cmd::MORE_SIZE,
        ] {
            assert!(size <= 16383, "{size}");
            assert_eq!(size % 8, 0);
        }
        assert_eq!(off::load::DATA + LOAD_CHUNK, cmd::LOAD_SIZE);
        assert_eq!(off::load::NAME + NAME_SIZE, off::load::DATA);
        for shape in [RunShape::LARGE, RunShape::SMALL] {
            assert_eq!(shape.out_at() + shape.out, shape.size);
            assert_eq!(RunShape::of(shape.cmd), Some(shape));
        }
        assert_eq!(cmd::RUN_SMALL_SIZE, 224);
        assert_eq!(off::log::TEXT + LOG_CHUNK, cmd::LOG_SIZE);
        assert_eq!(off::more::OUT + OUT_CHUNK, cmd::MORE_SIZE);
        assert_eq!(off::list::E_NAME + NAME_SIZE, cmd::LIST_ENTRY_SIZE);
        assert_eq!(
            off::list::ENTRIES + LIST_ENTRIES * cmd::LIST_ENTRY_SIZE,
            cmd::LIST_SIZE
        );
        // Linux: dir 3 in bits 30-31, size in 16-29, type 'N' in 8-15, nr in 0-7.
        assert_eq!(cmd::VERSION, 0xc008_4e01);
    }

    #[test]
    fn fields_round_trip_little_endian() {
        let mut b = request(cmd::RUN_SIZE, RUN_WRITE);
        b.put_u64(off::run::PROG_ID, 0x0102_0304_0506_0708);
        assert_eq!(b[8], 0x08);
        assert_eq!(b.u64_at(off::run::PROG_ID), 0x0102_0304_0506_0708);
        b.put_i32(off::run::STATUS, -22);
        assert_eq!(b.i32_at(off::run::STATUS), -22);
        b.put_str(off::load::NAME, NAME_SIZE, "btree_lookup");
        assert_eq!(b.str_at(off::load::NAME, NAME_SIZE), "btree_lookup");
        // Each struct goes with the oldest version that has it.
        assert_eq!(b.u32_at(off::VERSION), 1);
        assert_eq!(RunShape::SMALL.request(0).u32_at(off::VERSION), 2);
    }
}
