//! The appcode ABI: what a program may assume about its context, memory and helpers.
//!
//! Mirrored, name for name, by `bpf-progs/include/nearfs.h` and described in
//! `docs/abi.md`; `tests/abi.rs` compiles the header and checks that the two agree.

/// Bytes of the file a program sees per invocation: the data window.
pub const WINDOW_SIZE: usize = 4096;
/// Bytes of per-run scratch memory: zeroed when a run starts, kept across its hops.
pub const SCRATCH_SIZE: usize = 4096;
/// Largest argument blob a caller may pass.
pub const ARG_SIZE: usize = 1024;
/// Bytes of stack, shared by a program and the functions it calls.
pub const STACK_SIZE: usize = 512;

/// `struct nearfs_ctx`: field offsets, all little-endian `u64`. r1 points at it on entry.
pub mod ctx {
    /// Pointer to the data window (`WINDOW_SIZE` bytes at file offset `OFFSET`).
    pub const DATA: i16 = 0;
    /// Pointer one past the end of the data window.
    pub const DATA_END: i16 = 8;
    /// Pointer to the run's scratch memory (`SCRATCH_SIZE` bytes).
    pub const SCRATCH: i16 = 16;
    /// Pointer to the caller's argument blob (`ARG_SIZE` bytes, zero past `ARG_LEN`).
    pub const ARG: i16 = 24;
    /// Length of the argument blob.
    pub const ARG_LEN: i16 = 32;
    /// File offset of the first byte of the data window.
    pub const OFFSET: i16 = 40;
    /// The file range the run may use: `[RANGE_START, RANGE_END)`.
    pub const RANGE_START: i16 = 48;
    pub const RANGE_END: i16 = 56;
    /// File size when the run started.
    pub const FILE_SIZE: i16 = 64;
    /// Invocation number within the run: 0, then one more per hop.
    pub const HOP: i16 = 72;
    /// Writable: set it to a file offset to be invoked again with the window there (a
    /// chain hop). The runtime resets it to `NO_NEXT` before each invocation.
    pub const NEXT: i16 = 80;
    /// Size of the struct.
    pub const SIZE: usize = 88;
}

/// `ctx->next` when the program does not ask for another hop.
pub const NO_NEXT: u64 = u64::MAX;

/// Helper ids (the `imm` of `call`), their prototypes in [`prototype`].
pub mod helper {
    /// `long nearfs_read(u64 off, void *dst, u64 len)`: file bytes at `off` into program memory.
    pub const READ: i32 = 1;
    /// `long nearfs_write(u64 off, const void *src, u64 len)`: write file bytes (write runs only).
    pub const WRITE: i32 = 2;
    /// `long nearfs_emit(const void *src, u64 len)`: append bytes to the run's output.
    pub const EMIT: i32 = 3;
    /// `long nearfs_memcmp(const void *a, const void *b, u64 len)`: <0, 0 or >0.
    pub const MEMCMP: i32 = 4;
    /// `long nearfs_memmem(const void *hay, u64 hay_len, u64 start, const void *needle,
    /// u64 needle_len)`: offset in `hay` of the first match at or after `start`, or -1.
    /// (`start` is a number, not a moved pointer, so that the verifier can bound `hay`.)
    pub const MEMMEM: i32 = 5;
}

/// What a helper argument must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// Any initialised number.
    Scalar,
    /// A pointer the helper reads `len` bytes from; `len` is argument number `.0` (1-based).
    ReadMem(u8),
    /// A pointer the helper writes `len` bytes to; `len` is argument number `.0`.
    WriteMem(u8),
    /// A byte count, bounded by the memory argument that names it.
    Len,
}

/// A helper's name and arguments.
#[derive(Clone, Copy, Debug)]
pub struct Prototype {
    pub name: &'static str,
    pub args: &'static [Arg],
}

/// The prototype of helper `id`, if there is one.
pub fn prototype(id: i32) -> Option<Prototype> {
    use Arg::*;
    let (name, args): (&str, &'static [Arg]) = match id {
        helper::READ => ("nearfs_read", &[Scalar, WriteMem(3), Len]),
        helper::WRITE => ("nearfs_write", &[Scalar, ReadMem(3), Len]),
        helper::EMIT => ("nearfs_emit", &[ReadMem(2), Len]),
        helper::MEMCMP => ("nearfs_memcmp", &[ReadMem(3), ReadMem(3), Len]),
        helper::MEMMEM => ("nearfs_memmem", &[ReadMem(2), Len, Scalar, ReadMem(5), Len]),
        _ => return None,
    };
    Some(Prototype { name, args })
}

/// Helper ids, for registering them with an engine.
pub const HELPERS: [i32; 5] = [
    helper::READ,
    helper::WRITE,
    helper::EMIT,
    helper::MEMCMP,
    helper::MEMMEM,
];

/// Errors helpers return to the program, as negative numbers (Linux errno values).
pub mod errno {
    /// The offset lies outside the run's file range.
    pub const ERANGE: i64 = 34;
    /// A write from a run without write intent, or to bytes that are not allocated.
    pub const EPERM: i64 = 1;
    /// A run limit (device bytes, output bytes) is used up; the run will fail.
    pub const ENOSPC: i64 = 28;
    /// The device failed.
    pub const EIO: i64 = 5;
    /// A length of zero or an argument out of its domain.
    pub const EINVAL: i64 = 22;
}
