//! rbpf 0.4.1's engines: the interpreter, nearfs's reference for debugging and the fuzzers'
//! oracle, and the x86-64 JIT, kept only to measure the checked engine against.
//!
//! Neither is safe for programs from users (DESIGN.md): the JIT checks no access at all,
//! the interpreter only an access's first byte, and both keep rbpf's own stack, whose
//! address nearfs cannot see, so helpers must trust the verifier for stack pointers
//! ([`Addressing::Host`]). Programs reach them already verified, inlined, sanitized and
//! rewritten into forms rbpf computes exactly ([`crate::rewrite`]); each invocation is
//! charged its verified worst case, since rbpf counts nothing.
//!
//! rbpf helpers are plain functions with no context argument, so each invocation
//! publishes its run in [`CURRENT`] on the thread that executes it. rbpf's JIT calls
//! helpers with the stack 8 bytes off the 16-byte alignment the x86-64 ABI promises at a
//! call, so JIT code calls [`aligned`] trampolines, which realign it.

use std::cell::Cell;
use std::mem::ManuallyDrop;

use crate::abi::errno;
use crate::helpers::HELPERS;
use crate::memory::{Addressing, Arena, Globals, Memory};
use crate::run::{Run, RunError};
use crate::verify::TRAP_HELPER;

/// A program compiled for one of rbpf's engines.
pub(crate) struct Rbpf {
    vm: ManuallyDrop<rbpf::EbpfVmRaw<'static>>,
    /// The instruction bytes `vm` borrows; freed after it.
    code: *mut [u8],
    jit: bool,
}

// SAFETY: after construction the VM is only read: `execute_program` and the JIT entry take
// `&self`, the JIT code is never rewritten, and per-run state lives in the caller's arena
// and in thread-locals. `code` is owned and immutable.
unsafe impl Send for Rbpf {}
// SAFETY: as above; concurrent invocations share nothing mutable.
unsafe impl Sync for Rbpf {}

impl Rbpf {
    /// Builds `code` (rewritten for rbpf) for the interpreter or the JIT; the interpreter
    /// may read `globals`.
    pub(crate) fn new(code: Vec<u8>, jit: bool, globals: &Globals) -> Result<Rbpf, String> {
        // rbpf keeps its instruction pointer in an i16 when it jumps: past slot 32,767 it
        // lands somewhere else.
        if code.len() / 8 > i16::MAX as usize {
            return Err(format!(
                "{} slots once rewritten; rbpf's engines address at most {}",
                code.len() / 8,
                i16::MAX
            ));
        }
        let code = Box::into_raw(code.into_boxed_slice());
        // SAFETY: `code` stays allocated until `drop`, which drops the VM first.
        let bytes: &'static [u8] = unsafe { &*code };
        let build = || -> Result<rbpf::EbpfVmRaw<'static>, std::io::Error> {
            let mut vm = rbpf::EbpfVmRaw::new(Some(bytes))?;
            for (k, h) in HELPERS.iter().enumerate() {
                let f = if jit {
                    aligned::helper(k)
                } else {
                    interpreted(k)
                };
                vm.register_helper(h.id as u32, f)?;
            }
            let trap = if jit { aligned::trap() } else { trap_fn() };
            vm.register_helper(TRAP_HELPER as u32, trap)?;
            let g = globals.bytes();
            vm.register_allowed_memory(g.as_ptr() as u64..g.as_ptr() as u64 + g.len() as u64);
            if jit {
                vm.jit_compile()?;
            }
            Ok(vm)
        };
        // rbpf's JIT asserts that the code fits its one-page buffer: a large program panics
        // in there, which must cost a load, not the thread.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
            .unwrap_or_else(|_| Err(std::io::Error::other("rbpf's JIT cannot hold the program")));
        match built {
            Ok(vm) => Ok(Rbpf {
                vm: ManuallyDrop::new(vm),
                code,
                jit,
            }),
            Err(e) => {
                // SAFETY: nothing borrows `code` any more: the VM was not built.
                drop(unsafe { Box::from_raw(code) });
                Err(e.to_string())
            }
        }
    }

    /// Runs the program once with r1 pointing at the arena's context.
    pub(crate) fn invoke(
        &self,
        arena: &mut Arena,
        globals: &Globals,
        run: &mut Run<'_>,
    ) -> Result<u64, RunError> {
        let arena_host = arena.host();
        let mut host = Host {
            run,
            // SAFETY: rbpf reaches the arena only through the slice below, during the call.
            mem: unsafe { Memory::new(arena_host, globals.bytes(), Addressing::Host) },
        };
        let _published = Publish::new(&mut host);
        // SAFETY: rbpf wants the memory for the VM's lifetime but uses it only during this
        // call; the arena outlives the call and nothing else touches it meanwhile.
        let mem: &'static mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(arena_host, crate::memory::ARENA_SIZE) };
        let r = if self.jit {
            // SAFETY: the program was verified, inlined (no local calls, whose frames
            // rbpf's JIT overlaps), sanitized and rewritten into forms the JIT computes
            // exactly. This is the unchecked engine: a verifier bug is a hole here, which
            // is why nearfs runs it only to measure against.
            unsafe { self.vm.execute_program_jit(mem) }
        } else {
            // rbpf's interpreter has `unreachable!()`s of its own; one costs the run.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.vm.execute_program(mem)
            }))
            .unwrap_or_else(|_| Err(std::io::Error::other("rbpf's interpreter panicked")))
        };
        drop(_published);
        let run = host.run;
        if let Some(e) = run.take_stop() {
            return Err(e);
        }
        r.map_err(|e| RunError::Fault(e.to_string()))
    }
}

impl Drop for Rbpf {
    fn drop(&mut self) {
        // SAFETY: the VM is dropped exactly once, here, before the code it borrows.
        unsafe { ManuallyDrop::drop(&mut self.vm) };
        // SAFETY: `code` came from `Box::into_raw` in `new` and nothing borrows it now.
        drop(unsafe { Box::from_raw(self.code) });
    }
}

struct Host<'r, 'w> {
    run: &'r mut Run<'w>,
    mem: Memory<'r>,
}

thread_local! {
    static CURRENT: Cell<*mut Host<'static, 'static>> = const { Cell::new(std::ptr::null_mut()) };
}

/// Publishes an invocation's host to this thread's helpers until dropped.
struct Publish;

impl Publish {
    fn new(host: &mut Host<'_, '_>) -> Publish {
        let p: *mut Host<'_, '_> = host;
        CURRENT.with(|c| c.set(p.cast()));
        Publish
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// Calls `f` with the current invocation's host.
fn with_host(f: impl FnOnce(&mut Host<'_, '_>) -> u64) -> u64 {
    let p = CURRENT.with(|c| c.get());
    if p.is_null() {
        return (-errno::EINVAL) as u64;
    }
    // SAFETY: `Publish` set the pointer from a live `&mut Host` for the duration of the
    // invocation that is calling this helper, on this thread, and nothing else uses it
    // until the invocation returns.
    f(unsafe { &mut *p })
}

/// Calls helper number `k` of [`HELPERS`]: charges it, then runs it unless the run stopped.
fn call(k: usize, args: [u64; 5]) -> u64 {
    with_host(|host| {
        let h = &HELPERS[k];
        // rbpf counts nothing, so helper calls are where the clock is checked inside an
        // invocation.
        if !host.run.charge((h.cost)(&args)) || !host.run.check_clock() {
            return (-errno::ENOSPC) as u64;
        }
        h.call(host.run, &mut host.mem, &args)
    })
}

/// The verifier never reached the slot this call replaced; `a` is its slot.
fn trap(slot: u64) -> u64 {
    with_host(|host| {
        host.run.stop(RunError::Unverified {
            insn: slot as usize,
        });
        0
    })
}

/// Helper `k` as the interpreter calls it: a plain Rust function.
fn interpreted(k: usize) -> rbpf::ebpf::Helper {
    fn h<const K: usize>(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64 {
        call(K, [a, b, c, d, e])
    }
    const ALL: [rbpf::ebpf::Helper; 5] = [h::<0>, h::<1>, h::<2>, h::<3>, h::<4>];
    ALL[k]
}

fn trap_fn() -> rbpf::ebpf::Helper {
    fn t(a: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
        trap(a)
    }
    t
}

const _: () = assert!(
    HELPERS.len() == 5,
    "list every helper in `interpreted` and `aligned`"
);

/// Stack-realigning entry points for JIT code.
mod aligned {
    use super::*;

    type SysvHelper = extern "sysv64" fn(u64, u64, u64, u64, u64) -> u64;

    extern "sysv64" fn sysv<const K: usize>(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64 {
        call(K, [a, b, c, d, e])
    }

    extern "sysv64" fn sysv_trap(a: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
        super::trap(a)
    }

    macro_rules! trampoline {
        ($name:ident, $target:expr) => {
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
    trampoline!(t0, sysv::<0>);
    trampoline!(t1, sysv::<1>);
    trampoline!(t2, sysv::<2>);
    trampoline!(t3, sysv::<3>);
    trampoline!(t4, sysv::<4>);
    trampoline!(t_trap, sysv_trap);

    fn cast(f: SysvHelper) -> rbpf::ebpf::Helper {
        // SAFETY: both are code pointers of the same size; rbpf's JIT only takes the
        // address and calls it with arguments in rdi, rsi, rdx, rcx, r8 (System V).
        unsafe { std::mem::transmute::<SysvHelper, rbpf::ebpf::Helper>(f) }
    }

    /// The trampoline for helper number `k`, typed as rbpf wants it. JIT code calls it
    /// with the System V convention, which is what it is; nothing calls it as a Rust
    /// function.
    pub(super) fn helper(k: usize) -> rbpf::ebpf::Helper {
        cast([t0, t1, t2, t3, t4][k])
    }

    pub(super) fn trap() -> rbpf::ebpf::Helper {
        cast(t_trap)
    }
}
