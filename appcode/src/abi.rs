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

/// Helper ids (the `imm` of `call`); names, prototypes and costs are in [`crate::helpers`].
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
