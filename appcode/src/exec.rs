//! The boundary with rbpf: the engine that holds compiled code, and the helper trampolines
//! that reach the current run through a thread-local pointer. All of the crate's `unsafe`
//! that touches program memory or JIT code is here.
//!
//! rbpf helpers are plain `fn(u64, u64, u64, u64, u64) -> u64` with no context argument, so
//! each run publishes itself in [`CURRENT`] for the duration of one invocation, on the
//! thread that executes it. Helpers never unwind into JIT code: a panic is caught, recorded
//! as a fault of the run, and turned into an error return.
//!
//! rbpf's JIT calls helpers with the stack 8 bytes off the 16-byte alignment the x86-64
//! ABI promises at a call (its prologue `call`s into the program body to make `exit` a
//! `ret`), so compiled Rust that keeps aligned vectors on the stack faults. JIT code
//! therefore calls [`aligned`] trampolines, which realign the stack and call the helper.

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::abi::{self, errno, helper};
use crate::run::Run;

/// Which rbpf engine executes a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// rbpf's x86-64 JIT.
    Jit,
    /// rbpf's interpreter, for debugging.
    Interpreter,
}

/// A program compiled for one engine.
pub(crate) struct Engine {
    vm: ManuallyDrop<rbpf::EbpfVmRaw<'static>>,
    /// The instruction bytes `vm` borrows; freed after it.
    code: *mut [u8],
    mode: Mode,
}

// SAFETY: after construction the VM is only read: `execute_program` and the JIT entry take
// `&self`, the JIT code is never rewritten, and per-run state lives in the caller's memory
// and in thread-locals. `code` is owned and immutable.
unsafe impl Send for Engine {}
// SAFETY: as above; concurrent invocations share nothing mutable.
unsafe impl Sync for Engine {}

impl Engine {
    /// Compiles `code` (instructions that passed verification and rewriting). `readable`
    /// lists host memory the interpreter must let the program read (its globals).
    pub(crate) fn new(
        code: Vec<u8>,
        mode: Mode,
        readable: &[std::ops::Range<u64>],
    ) -> Result<Engine, String> {
        let code = Box::into_raw(code.into_boxed_slice());
        // SAFETY: `code` stays allocated until `drop`, which drops the VM first.
        let bytes: &'static [u8] = unsafe { &*code };
        let build = || -> Result<rbpf::EbpfVmRaw<'static>, std::io::Error> {
            let mut vm = rbpf::EbpfVmRaw::new(Some(bytes))?;
            for id in abi::HELPERS {
                let f = match mode {
                    Mode::Jit => aligned::helper(id),
                    Mode::Interpreter => helper(id),
                };
                vm.register_helper(id as u32, f)?;
            }
            for r in readable {
                vm.register_allowed_memory(r.clone());
            }
            if mode == Mode::Jit {
                vm.jit_compile()?;
            }
            Ok(vm)
        };
        match build() {
            Ok(vm) => Ok(Engine {
                vm: ManuallyDrop::new(vm),
                code,
                mode,
            }),
            Err(e) => {
                // SAFETY: nothing borrows `code` any more: the VM was not built.
                drop(unsafe { Box::from_raw(code) });
                Err(e.to_string())
            }
        }
    }

    /// Runs the program once with r1 pointing at `mem[0]`, publishing `run` to helpers.
    pub(crate) fn invoke(&self, mem: &mut [u8], run: &mut Run<'_>) -> Result<u64, String> {
        let _published = Publish::new(run);
        let len = mem.len();
        // SAFETY: rbpf wants the memory for the VM's lifetime, but uses it only during this
        // call; `mem` outlives the call.
        let mem: &'static mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(mem.as_mut_ptr(), len) };
        let r = match self.mode {
            Mode::Interpreter => self.vm.execute_program(mem),
            // SAFETY: the program was verified (every access lies in the context, data window,
            // scratch, argument, stack or its read-only globals, all live during the call),
            // inlined (no local calls, whose frames rbpf's JIT would overlap) and rewritten
            // into forms the JIT computes exactly; it terminates within its verified bound.
            Mode::Jit => unsafe { self.vm.execute_program_jit(mem) },
        };
        r.map_err(|e| e.to_string())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: the VM is dropped exactly once, here, before the code it borrows.
        unsafe { ManuallyDrop::drop(&mut self.vm) };
        // SAFETY: `code` came from `Box::into_raw` in `new` and nothing borrows it now.
        drop(unsafe { Box::from_raw(self.code) });
    }
}

thread_local! {
    static CURRENT: Cell<*mut Run<'static>> = const { Cell::new(std::ptr::null_mut()) };
}

/// Publishes a run to this thread's helpers until dropped.
struct Publish;

impl Publish {
    fn new(run: &mut Run<'_>) -> Publish {
        let p: *mut Run<'_> = run;
        CURRENT.with(|c| c.set(p.cast()));
        Publish
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Calls `f` with the current run; errors and panics become negative errno returns.
fn with_run(f: impl FnOnce(&mut Run<'_>) -> i64) -> u64 {
    let p = CURRENT.with(|c| c.get());
    if p.is_null() {
        return (-errno::EINVAL) as u64;
    }
    // SAFETY: `Publish` set the pointer from a live `&mut Run` for the duration of the
    // invocation that is calling this helper, on this thread, and nothing else uses the run
    // until the invocation returns.
    let run = unsafe { &mut *p };
    match catch_unwind(AssertUnwindSafe(|| f(run))) {
        Ok(v) => v as u64,
        Err(_) => {
            run.fault_helper_panic();
            (-errno::EIO) as u64
        }
    }
}

/// Guest memory `[p, p + len)` as a slice.
///
/// # Safety
/// The verifier proved that a helper argument of this kind names `len` readable bytes of
/// one region (stack, scratch, data window, argument or globals) live for the invocation.
unsafe fn guest<'a>(p: u64, len: u64) -> &'a [u8] {
    // SAFETY: the caller's proof.
    unsafe { std::slice::from_raw_parts(p as *const u8, len as usize) }
}

/// As [`guest`], for memory the helper writes (stack or scratch).
///
/// # Safety
/// As [`guest`], and the region is writable and not aliased during the helper call.
unsafe fn guest_mut<'a>(p: u64, len: u64) -> &'a mut [u8] {
    // SAFETY: the caller's proof.
    unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len as usize) }
}

/// Lengths beyond any region cannot have been proven; refuse them outright.
fn plausible(len: u64) -> bool {
    len <= abi::WINDOW_SIZE.max(abi::SCRATCH_SIZE).max(abi::ARG_SIZE) as u64
}

extern "sysv64" fn h_read(off: u64, dst: u64, len: u64, _: u64, _: u64) -> u64 {
    with_run(|run| {
        if !plausible(len) {
            return -errno::EINVAL;
        }
        // SAFETY: `WriteMem(3)` argument, proven by the verifier.
        run.read(off, unsafe { guest_mut(dst, len) })
    })
}

extern "sysv64" fn h_write(off: u64, src: u64, len: u64, _: u64, _: u64) -> u64 {
    with_run(|run| {
        if !plausible(len) {
            return -errno::EINVAL;
        }
        // SAFETY: `ReadMem(3)` argument, proven by the verifier.
        run.write(off, unsafe { guest(src, len) })
    })
}

extern "sysv64" fn h_emit(src: u64, len: u64, _: u64, _: u64, _: u64) -> u64 {
    with_run(|run| {
        if !plausible(len) {
            return -errno::EINVAL;
        }
        // SAFETY: `ReadMem(2)` argument, proven by the verifier.
        run.emit(unsafe { guest(src, len) })
    })
}

extern "sysv64" fn h_memcmp(a: u64, b: u64, len: u64, _: u64, _: u64) -> u64 {
    with_run(|_| {
        if !plausible(len) {
            return -errno::EINVAL;
        }
        // SAFETY: two `ReadMem(3)` arguments, proven by the verifier.
        let (a, b) = unsafe { (guest(a, len), guest(b, len)) };
        a.cmp(b) as i64
    })
}

extern "sysv64" fn h_memmem(
    hay: u64,
    hay_len: u64,
    start: u64,
    needle: u64,
    needle_len: u64,
) -> u64 {
    with_run(|_| {
        if !plausible(hay_len) || !plausible(needle_len) {
            return -errno::EINVAL;
        }
        if start > hay_len {
            return -1;
        }
        // SAFETY: `ReadMem(2)` and `ReadMem(5)` arguments, proven by the verifier.
        let (h, n) = unsafe { (guest(hay, hay_len), guest(needle, needle_len)) };
        memmem(&h[start as usize..], n).map_or(-1, |at| (start as usize + at) as i64)
    })
}

/// Offset of the first occurrence of `needle` in `hay`.
pub fn memmem(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    let (&first, rest) = needle.split_first()?;
    let mut at = 0;
    while at + needle.len() <= hay.len() {
        let i = hay[at..=hay.len() - needle.len()]
            .iter()
            .position(|&b| b == first)?;
        at += i;
        if hay[at + 1..at + needle.len()] == *rest {
            return Some(at);
        }
        at += 1;
    }
    None
}

type SysvHelper = extern "sysv64" fn(u64, u64, u64, u64, u64) -> u64;

/// Helpers as the interpreter calls them: plain Rust functions.
fn helper(id: i32) -> rbpf::ebpf::Helper {
    macro_rules! rust {
        ($f:ident) => {{
            fn call(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64 {
                $f(a, b, c, d, e)
            }
            call
        }};
    }
    match id {
        helper::READ => rust!(h_read),
        helper::WRITE => rust!(h_write),
        helper::EMIT => rust!(h_emit),
        helper::MEMCMP => rust!(h_memcmp),
        _ => rust!(h_memmem),
    }
}

/// Stack-realigning entry points for JIT code.
mod aligned {
    use super::*;

    macro_rules! trampoline {
        ($name:ident, $target:ident) => {
            /// Realigns the stack to 16 bytes, then calls the helper with the same
            /// arguments (rdi, rsi, rdx, rcx, r8 are untouched).
            #[unsafe(naked)]
            extern "sysv64" fn $name(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
                core::arch::naked_asm!(
                    "push rbp",
                    "mov rbp, rsp",
                    "and rsp, -16",
                    "call {target}",
                    "mov rsp, rbp",
                    "pop rbp",
                    "ret",
                    target = sym $target,
                )
            }
        };
    }
    trampoline!(t_read, h_read);
    trampoline!(t_write, h_write);
    trampoline!(t_emit, h_emit);
    trampoline!(t_memcmp, h_memcmp);
    trampoline!(t_memmem, h_memmem);

    /// The trampoline for helper `id`, typed as rbpf wants it. JIT code calls it with
    /// the System V convention, which is what it is; nothing calls it as a Rust function.
    pub(super) fn helper(id: i32) -> rbpf::ebpf::Helper {
        let f: SysvHelper = match id {
            helper::READ => t_read,
            helper::WRITE => t_write,
            helper::EMIT => t_emit,
            helper::MEMCMP => t_memcmp,
            _ => t_memmem,
        };
        // SAFETY: both are code pointers of the same size; rbpf's JIT only takes the
        // address and calls it with arguments in rdi, rsi, rdx, rcx, r8 (System V).
        unsafe { std::mem::transmute::<SysvHelper, rbpf::ebpf::Helper>(f) }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memmem_finds_the_first_match() {
        assert_eq!(super::memmem(b"abcabd", b"abd"), Some(3));
        assert_eq!(super::memmem(b"abc", b"abcd"), None);
        assert_eq!(super::memmem(b"aaa", b""), Some(0));
        assert_eq!(super::memmem(b"xxa", b"a"), Some(2));
    }
}
